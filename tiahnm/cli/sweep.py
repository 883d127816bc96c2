"""``tiahnm sweep``: trials over config keys (grid or Optuna), ranked on validation."""

from __future__ import annotations

from pathlib import Path

import click

from tiahnm.cli import CONTEXT_SETTINGS, _guard, _load
from tiahnm.cli.options import cli_device, cli_output_path, cli_set


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--jobs",
    type=int,
    default=1,
    show_default=True,
    help="Trials run at once, each in its own process.",
)
@click.option(
    "--storage",
    default=None,
    help="Optuna storage URL shared by every worker and machine "
    "(default: sqlite:///OUTPUT/sweep.db).",
)
@cli_set()
@cli_output_path()
@cli_device()
@_guard
def sweep(
    config: str,
    jobs: int,
    storage: str | None,
    overrides: tuple[str, ...],
    output_path: str | None,
    device: str | None,
) -> None:
    """Run the trials of CONFIG's `sweep` section, each a `tiahnm run` in OUTPUT/trials/<id>/.

    method grid runs every combination of the listed values; method optuna runs
    n_trials of Optuna's TPE search. Trials are ranked by the validation metric
    (sweep.metric, val_<name>) alone; OUTPUT/sweep_summary.json and OUTPUT/sweep.md
    give the ranking and the test metrics of the chosen trial. Rerunning resumes:
    finished trials are kept, failed or interrupted ones run again in their folder.
    Start the same command on other machines with a shared --storage database (and
    output folder) to add workers.
    """
    from tiahnm.cli.extract import _setup_logging
    from tiahnm.sweep import run_sweep

    _setup_logging(verbose=False)
    cfg = _load(config, overrides, output_dir=output_path, **{"train.device": device})
    summary = run_sweep(cfg, storage=storage, jobs=jobs, echo=click.echo)
    best = summary["best"]
    out = Path(cfg.output_dir)
    if best is None:
        click.echo("No finished trial yet.")
        return
    click.echo(
        f"\nBest on {summary['metric']}: trial {best['id']} {best['params']} "
        f"({summary['trials'][0][summary['metric']]:.4f})"
    )
    auc = (best.get("test_metrics") or {}).get("auc")
    if auc:
        click.echo(f"Its test AUC: {auc['mean']:.4f} +- {auc['std']:.4f}")
    click.echo(f"Results: {out / 'sweep_summary.json'}, {out / 'sweep.md'}")
