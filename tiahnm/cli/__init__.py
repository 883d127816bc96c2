"""The ``tiahnm`` command line.

Heavy modules (torch, TIAToolbox) are imported inside the commands, so ``tiahnm
--help`` stays fast. Plugins add commands through the ``tiahnm_register_commands``
hook.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tiahnm import __version__, errors
from tiahnm.cli.options import cli_device, cli_output_path, cli_seed, cli_set
from tiahnm.errors import EXIT_PARTIAL

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Exit codes (docs/reliability.md): 0 success, 1 a run failed on its data, 2 bad usage /
# config / plugin name, 3 partial success (some slides failed and were skipped), 4 the
# system refused (disk full, read-only, permissions, out of memory), 5 the output folder
# is in use by another tiahnm process, 70 an internal error (a bug).
EXIT_DATA, EXIT_USAGE, EXIT_PARTIAL = errors.EXIT_DATA, errors.EXIT_USAGE, EXIT_PARTIAL


#: click's own control flow (usage errors, ctx.exit(), Ctrl-C): never an `Error:` line here.
_CLICK_FLOW = (click.ClickException, click.exceptions.Exit, click.Abort)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn documented errors into a one-line message and an exit code."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # every failure becomes one `Error:` line
            if isinstance(exc, _CLICK_FLOW) or os.environ.get("TIAHNM_TRACEBACK"):
                raise
            message, code = errors.error_line(exc)
            click.echo(f"Error: {message}", err=True)
            sys.exit(code)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class TiahnmGroup(click.Group):
    """A group that adds plugin commands on first use."""

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from tiahnm.plugins import get_plugin_manager

        pm = get_plugin_manager().pm
        for impl in pm.hook.tiahnm_register_commands.get_hookimpls():
            try:
                impl.function(cli=self)
            except (Exception, SystemExit) as exc:  # one plugin must not stop all
                click.echo(
                    f"Warning: plugin {impl.plugin_name!r} failed to add its "
                    f"commands ({type(exc).__name__}: {exc}); they are skipped.",
                    err=True,
                )

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Built-in and plugin commands."""
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Find a command, loading plugin commands if needed."""
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            self._load_plugin_commands()
            cmd = super().get_command(ctx, cmd_name)
        return cmd


@click.group(cls=TiahnmGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-v", "--version", prog_name="tiahnm")
def cli() -> None:
    """tiahnm: hard-instance mining for weakly supervised WSI classification (MIL)."""


def _load(
    config_path: str | None, overrides: tuple[str, ...], **cli_values: Any
) -> Any:
    from tiahnm.config import load_config

    extra = [f"{k}={v}" for k, v in cli_values.items() if v is not None]
    return load_config(config_path, [*extra, *overrides])


def _print_summary(summary: dict[str, Any], output_dir: str) -> None:
    from tiahnm.runtime.distributed import env_context

    if not env_context().is_main:  # under torchrun only rank 0 reports
        return
    click.echo(
        f"\n{summary['head']} + miner {summary['miner']}: {summary['n_folds']} folds"
    )
    click.echo(f"{'metric':<20}{'mean':>8}{'std':>8}   95% CI (pooled)")
    for name, stats in summary["metrics"].items():
        ci = stats.get("ci95")
        shown = f"   [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""
        click.echo(f"{name:<20}{stats['mean']:>8.3f}{stats['std']:>8.3f}{shown}")
    click.echo(f"\nResults: {Path(output_dir) / 'summary.json'}")


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--demo",
    is_flag=True,
    help="Run the built-in demo (also what `tiahnm run` without CONFIG does).",
)
@click.option(
    "--quick",
    is_flag=True,
    help="With the demo: 4 small slides, 2 folds, 2 epochs (a check of the install).",
)
@cli_set()
@cli_output_path()
@cli_device()
@cli_seed()
@click.option("--verbose", is_flag=True, help="Show TIAToolbox's log messages too.")
@_guard
def run(
    config: str | None,
    demo: bool,  # noqa: FBT001 - click flag
    quick: bool,  # noqa: FBT001 - click flag
    overrides: tuple[str, ...],
    output_path: str | None,
    device: str | None,
    seed: int | None,
    verbose: bool,  # noqa: FBT001 - click flag
) -> None:
    """Run every stage CONFIG asks for: extract, train + evaluate under CV, heatmaps, report.

    The extract stage runs when the config lists slides, the heatmaps stage when
    evaluation.heatmaps is not 0. Stages already done with the same settings are
    skipped (OUTPUT/stages.json records them), so an interrupted run resumes where it
    stopped. `tiahnm init` writes a commented CONFIG.

    Without CONFIG (or with --demo) it runs the built-in demo: synthetic slides with
    known tumour regions, generated into --output-path (default ./tiahnm-demo),
    through TIAToolbox tiling, a small CNN encoder, AB-MIL with MHIM-MIL mining,
    heatmaps and a report, in a few minutes on a CPU.
    """
    from tiahnm.cli.extract import _setup_logging

    _setup_logging(verbose=verbose)
    if demo and config is not None:
        raise click.UsageError("give either CONFIG or --demo, not both.")
    if quick and config is not None:
        raise click.UsageError("--quick applies to the demo only (no CONFIG).")
    if config is None:
        from tiahnm.demo import DEFAULT_OUTPUT, prepare_demo

        root = output_path or DEFAULT_OUTPUT
        click.echo(f"tiahnm demo in {Path(root).resolve()}")
        config, drawn = prepare_demo(
            root,
            size="quick" if quick else "full",
            on_slide=lambda sid: click.echo(f"[data] drawing synthetic slide {sid}"),
        )
        if not drawn:
            click.echo("[data] skipped (synthetic slides already there)")
        output_path = None  # the demo config already writes there
    cfg = _load(
        str(config),
        overrides,
        output_dir=output_path,
        **{"train.device": device, "seed": seed},
    )
    from tiahnm.pipeline import run_pipeline

    result = run_pipeline(cfg, echo=click.echo)
    _print_summary(result.summary, cfg.output_dir)
    if result.report is not None:
        click.echo(f"Report: {result.report}")
    if result.exit_code:
        click.echo("Some slides failed and were skipped (see failures.csv).", err=True)
        sys.exit(result.exit_code)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--features-dir",
    type=click.Path(file_okay=False),
    help="Folder of <slide_id>.h5 feature files.",
)
@click.option(
    "--labels-csv", type=click.Path(dir_okay=False), help="CSV slide_id,label[,split]."
)
@click.option(
    "--mil-csv",
    type=click.Path(dir_okay=False),
    help="Classic MIL CSV (label, bag_id, features).",
)
@click.option("--head", default=None, help="MIL head name (see `tiahnm plugins`).")
@click.option("--miner", default=None, help="Miner name (see `tiahnm plugins`).")
@click.option("--folds", type=int, default=None, help="Cross-validation folds.")
@click.option("--repeats", type=int, default=None, help="Repeats of the k-fold CV.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs.")
@cli_set()
@cli_output_path()
@cli_device()
@cli_seed()
@_guard
def train(
    config: str | None,
    features_dir: str | None,
    labels_csv: str | None,
    mil_csv: str | None,
    head: str | None,
    miner: str | None,
    folds: int | None,
    repeats: int | None,
    epochs: int | None,
    overrides: tuple[str, ...],
    output_path: str | None,
    device: str | None,
    seed: int | None,
) -> None:
    """Cross-validate a MIL head (+ miner) on precomputed features.

    Give a CONFIG, or the data with --features-dir/--labels-csv or --mil-csv; the
    options override the config.
    """
    values: dict[str, Any] = {
        "output_dir": output_path,
        "head.name": head,
        "miner.name": miner,
        "cv.folds": folds,
        "cv.repeats": repeats,
        "train.epochs": epochs,
        "train.device": device,
        "seed": seed,
    }
    if mil_csv and (features_dir or labels_csv):
        raise click.UsageError("use either --mil-csv or --features-dir/--labels-csv.")
    if mil_csv:
        values |= {"data.source": "mil_csv", "data.options.path": mil_csv}
    elif features_dir or labels_csv:
        if not (features_dir and labels_csv):
            raise click.UsageError("--features-dir and --labels-csv go together.")
        values |= {
            "data.source": "h5_folder",
            "data.options.features_dir": features_dir,
            "data.options.labels_csv": labels_csv,
        }
    elif config is None:
        raise click.UsageError(
            "give a CONFIG, --mil-csv, or --features-dir with --labels-csv."
        )
    cfg = _load(config, overrides, **values)
    from tiahnm.crossval import run_training
    from tiahnm.validate import validate_config

    validate_config(cfg, warn=lambda w: click.echo(f"Warning: {w}", err=True))

    summary = run_training(cfg)
    _print_summary(summary, cfg.output_dir)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--kind",
    default=None,
    help="Only this kind (head, miner, loss, encoder, bag_source, callback).",
)
@_guard
def plugins(as_json: bool, kind: str | None) -> None:  # noqa: FBT001 - click flag
    """List registered heads, miners, losses, encoders, bag sources and callbacks."""
    from tiahnm.plugins import get_plugin_manager

    pm = get_plugin_manager()
    rows = pm.table()
    if kind is not None:
        pm.get(kind)  # validates the kind
        rows = [r for r in rows if r["kind"] == kind]
    if as_json:
        payload = {
            "plugins": rows,
            "failures": [vars(f) for f in pm.failures],
        }
        click.echo(json.dumps(payload, indent=2))
        return
    cols = ("name", "kind", "package", "version", "description")
    widths = {
        c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in cols
    }
    widths["description"] = min(widths["description"], 60)
    click.echo("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    click.echo("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        click.echo("  ".join(r[c][: widths[c]].ljust(widths[c]) for c in cols).rstrip())
    for f in pm.failures:
        click.echo(
            f"FAILED to load plugin {f.name!r} ({f.package}): {f.error}", err=True
        )


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument(
    "path", required=False, default="tiahnm.yaml", type=click.Path(dir_okay=False)
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@_guard
def init(path: str, force: bool) -> None:  # noqa: FBT001 - click flag
    """Write a commented config template to PATH (default tiahnm.yaml)."""
    from tiahnm.config import template
    from tiahnm.utils.io import atomic_open

    target = Path(path)
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; use --force to overwrite.")
    with atomic_open(target, "w", encoding="utf-8") as fh:
        fh.write(template())
    click.echo(f"Wrote {target}. Edit it, then: tiahnm run {target}")


from tiahnm.cli.encoders import encoders  # noqa: E402
from tiahnm.cli.evaluate import evaluate, heatmap, predict, report  # noqa: E402
from tiahnm.cli.extract import extract  # noqa: E402 - needs the helpers above
from tiahnm.cli.sweep import sweep  # noqa: E402 - needs the helpers above

cli.add_command(extract)
cli.add_command(encoders)
cli.add_command(predict)
cli.add_command(heatmap)
cli.add_command(report)
cli.add_command(sweep)
cli.add_command(evaluate)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="tiahnm")
