"""The run report: ``report.md`` with the metrics table, ROC and confusion matrix.

Written at the end of :func:`tiahnm.crossval.run_training` (``evaluation.report``)
and by ``tiahnm report RUN_DIR``. Plots use matplotlib's Agg canvas directly (no
pyplot, no global backend switch). Heatmap PNGs found in ``RUN_DIR/heatmaps/`` (e.g.
from ``tiahnm heatmap RUN_DIR --output-path RUN_DIR/heatmaps``) are linked.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.errors import DataError
from tiahnm.evaluation.metrics import INSTANCE_METRICS, pooled_predictions
from tiahnm.evaluation.reference import class_names_from_config
from tiahnm.training.metrics import METRICS
from tiahnm.utils.io import atomic_open, atomic_path

logger = logging.getLogger(__name__)

NAMES = {
    "auc": "AUC",
    "accuracy": "accuracy",
    "f1": "F1",
    "balanced_accuracy": "balanced accuracy",
    "precision": "precision",
    "recall": "recall (sensitivity)",
    "fpr": "false-positive rate",
    "loss": "loss",
    "instance_auc": "instance AUC",
    "instance_ap": "instance average precision",
    "instance_f1": "instance F1",
    "c_index": "c-index (Harrell)",
    "uno_c_index": "c-index (Uno, IPCW)",
    "td_auc": "time-dependent AUC (mean)",
    "logrank_p": "log-rank p (risk groups)",
    "kappa": "Cohen's kappa",
}
#: Heatmap images shown inline in the report (the rest are linked).
MAX_INLINE_HEATMAPS = 12


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_roc(pooled: dict[int, dict[str, np.ndarray]], path: str | Path) -> Path | None:
    """ROC curve of the pooled test predictions of each repeat (binary tasks).

    Args:
        pooled (dict): Output of :func:`~tiahnm.evaluation.metrics.pooled_predictions`.
        path (str | Path): The PNG.

    Returns:
        Path | None: ``path``, or None when no repeat has both classes.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    curves = []
    for rep, p in pooled.items():
        y = p["label"]
        if len(np.unique(y)) != 2 or y.max() > 1:
            continue
        fpr, tpr, _ = roc_curve(y, p["probability"])
        curves.append((rep, fpr, tpr, roc_auc_score(y, p["probability"])))
    if not curves:
        return None
    fig = _new_figure(4.6, 4.4)
    ax = fig.add_subplot()
    for rep, fpr, tpr, auc in curves:
        ax.plot(fpr, tpr, lw=1.6, label=f"repeat {rep}: AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1)
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title="ROC, pooled test predictions",
    )
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def confusion_counts(pooled: dict[int, dict[str, np.ndarray]]) -> np.ndarray:
    """``[C, C]`` counts (rows: label, columns: prediction) summed over repeats."""
    labels = np.concatenate([p["label"] for p in pooled.values()])
    preds = np.concatenate([p["prediction"] for p in pooled.values()])
    n = int(max(2, labels.max(initial=0) + 1, preds.max(initial=0) + 1))
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (labels, preds), 1)
    return counts


def plot_confusion(
    pooled: dict[int, dict[str, np.ndarray]],
    path: str | Path,
    class_names: dict[int, str] | None = None,
) -> Path | None:
    """Confusion matrix of the test predictions at the validation-chosen thresholds.

    Args:
        pooled (dict): Output of :func:`~tiahnm.evaluation.metrics.pooled_predictions`.
        path (str | Path): The PNG.
        class_names (dict[int, str] | None): Tick labels (default the indices).

    Returns:
        Path | None: ``path``, or None without predictions.
    """
    if not pooled or not any(len(p["label"]) for p in pooled.values()):
        return None
    counts = confusion_counts(pooled)
    rows = counts.sum(1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = _new_figure(4.2, 3.8)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n({frac[i, j]:.0%})",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.6 else "black",
                fontsize=10,
            )
    ticks = range(counts.shape[0])
    names = [(class_names or {}).get(i, str(i)) for i in ticks]
    ax.set_xticks(ticks, names)
    ax.set_yticks(ticks, names)
    ax.set(xlabel="prediction", ylabel="label")
    reps = len(pooled)
    ax.set_title(
        "Test confusion matrix" + (f" (sum of {reps} repeats)" if reps > 1 else ""),
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of label row")
    fig.tight_layout()
    return _save(fig, Path(path))


def metric_cells(
    summary: dict[str, Any], keys: Sequence[str], ci_format: str = "[{}, {}]"
) -> list[tuple[str, str, str, str]]:
    """``(name, mean ± std, pooled, 95% CI)`` of each metric of ``keys`` the run has.

    Shared by ``report.md`` and ``report.html``; ``ci_format`` joins the two bounds.
    """
    cells = []
    for key in keys:
        m = summary.get("metrics", {}).get(key)
        if not m:
            continue
        ci = m.get("ci95")
        ci_text = ci_format.format(_fmt(ci[0]), _fmt(ci[1])) if ci else "-"
        cells.append(
            (
                NAMES.get(key, key),
                f"{_fmt(m.get('mean'))} ± {_fmt(m.get('std'))}",
                _fmt(m.get("pooled")),
                ci_text,
            )
        )
    return cells


def _metric_rows(summary: dict[str, Any], keys: Sequence[str]) -> list[str]:
    return [
        f"| {name} | {spread} | {pooled} | {ci} |"
        for name, spread, pooled, ci in metric_cells(summary, keys)
    ]


def _patient_section(summary: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """The patient-level metrics table (``[]`` without patients)."""
    rows = _metric_rows({"metrics": summary.get("patient_metrics", {})}, keys)
    if not rows:
        return []
    return [
        "## Patient-level test metrics (mean slide output per patient)",
        "",
        "| metric | mean ± std over folds | pooled | 95% CI (pooled) |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def _config(out: Path) -> dict[str, Any]:
    path = out / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    from tiahnm.utils.safe_yaml import safe_load

    try:
        return safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def write_report(
    output_dir: str | Path,
    summary: dict[str, Any],
    results: Sequence[dict[str, Any]],
    task: Any = None,
) -> Path:
    """Write ``report.md``, ``roc.png`` and ``confusion.png`` in ``output_dir``.

    Args:
        output_dir (str | Path): The run folder.
        summary (dict): ``summary.json`` content.
        results (Sequence[dict]): Fold results (``result.json`` content).
        task (Task | None): Its ``report_metrics`` and ``report_sections`` (survival
            curves, per-class tables); default the binary report.

    Returns:
        Path: ``report.md``.
    """
    out = Path(output_dir)
    cfg = _config(out)
    ev = cfg.get("evaluation", {}) or {}
    keys = list(METRICS) if task is None else list(task.report_metrics)
    pooled = pooled_predictions(results)
    roc = plot_roc(pooled, out / "roc.png")
    cm = plot_confusion(pooled, out / "confusion.png", class_names_from_config(cfg))
    losses = ", ".join(summary.get("losses", [])) or "none"
    n_rep = len({r["repeat"] for r in results})
    lines = [
        f"# Run report: {summary.get('head')} + miner {summary.get('miner')}",
        "",
        f"Extra losses: {losses}. {summary.get('n_folds')} test folds"
        + (f" ({n_rep} repeats)" if n_rep > 1 else "")
        + f"; {sum(len(r['predictions']) for r in results)} test predictions.",
        "",
        _selection_sentence(results, ev),
        "",
        "## Slide-level test metrics",
        "",
        "| metric | mean ± std over folds | pooled | 95% CI (pooled) |",
        "|---|---|---|---|",
        *_metric_rows(summary, [*keys, "loss"]),
        "",
    ]
    lines += _patient_section(summary, keys)
    ci = summary.get("ci")
    if ci:
        lines += [
            f"*Pooled*: the metric of all test predictions of a repeat together, "
            f"averaged over repeats. *95% CI*: {ci['method']}; {ci['n_resamples']} "
            f"resamples, seed {ci['seed']}.",
            "",
        ]
    inst = _metric_rows(summary, INSTANCE_METRICS)
    if inst:
        lines += [
            "## Instance-level test metrics (patch labels)",
            "",
            "Instance scores are the head's default evaluation score; instance F1 uses "
            f"`evaluation.instance_threshold: {ev.get('instance_threshold', '0.5')}`.",
            "",
            "| metric | mean ± std over folds | pooled | 95% CI (pooled) |",
            "|---|---|---|---|",
            *inst,
            "",
        ]
    lines += _plots_section(roc, cm)
    if task is not None:
        lines += task.report_sections(out, results, summary)
    lines += _folds_section(results)
    lines += _heatmaps_section(out)
    path = out / "report.md"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path


def _plots_section(roc: Any, cm: Any) -> list[str]:
    """Links to the ROC and confusion plots that were drawn."""
    if not (roc or cm):
        return []
    lines = ["## Plots", ""]
    if roc:
        lines += ["![ROC curve of the pooled test predictions](roc.png)", ""]
    if cm:
        lines += [
            "![Confusion matrix at the validation-chosen thresholds](confusion.png)",
            "",
        ]
    return lines


def _folds_section(results: Sequence[dict[str, Any]]) -> list[str]:
    """One row per fold: best epoch, threshold, test metrics."""
    lines = [
        "## Folds",
        "",
        "| repeat | fold | best epoch | threshold | AUC | accuracy | F1 | n test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['repeat']} | {r['fold']} | {r.get('best_epoch', '-')} "
            f"| {_fmt(r.get('threshold'))} | {_fmt(m.get('auc'))} "
            f"| {_fmt(m.get('accuracy'))} | {_fmt(m.get('f1'))} "
            f"| {r.get('n_test', len(r['predictions']))} |"
        )
    lines.append("")
    return lines


def _heatmaps_section(out: Path) -> list[str]:
    """The run's heatmaps (the first inline, the rest linked), or how to draw them."""
    heatmaps = sorted(
        p for p in (out / "heatmaps").glob("*.png") if not p.stem.endswith("_overlay")
    )
    if not heatmaps:
        return [
            "Heatmaps: `tiahnm heatmap "
            f"{out} --output-path {out / 'heatmaps'}`, then `tiahnm report {out}` "
            "to link them here.",
            "",
        ]
    lines = ["## Heatmaps", ""]
    for i, p in enumerate(heatmaps):
        rel = p.relative_to(out).as_posix()
        if i < MAX_INLINE_HEATMAPS:
            lines += [f"![{p.stem}]({rel})", ""]
        else:
            lines.append(f"- [{p.stem}]({rel})")
    lines.append("")
    return lines


def write_report_safely(
    output_dir: str | Path,
    summary: dict[str, Any],
    results: Sequence[dict[str, Any]],
    task: Any = None,
) -> Path | None:
    """:func:`write_report`, warning instead of failing (the run itself is done)."""
    try:
        return write_report(output_dir, summary, results, task)
    except Exception as exc:
        msg = f"could not write the run report ({type(exc).__name__}: {exc})."
        logger.debug("report failed", exc_info=True)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return None


def _read_json(path: Path) -> Any:
    """A run's JSON file; a damaged one is a DataError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        msg = (
            f"{path}: damaged JSON ({exc}); run the same `tiahnm run`/`tiahnm train` "
            "command again to recompute it."
        )
        raise DataError(msg) from None


def _selection_sentence(results: Sequence[dict[str, Any]], ev: dict[str, Any]) -> str:
    """How the epoch and threshold were chosen, true to the folds' validation sets."""
    without = [r for r in results if not r.get("n_val", 1)]
    if not without:
        return (
            "Model selection (epoch) and the decision threshold "
            f"(`evaluation.threshold: {ev.get('threshold', '0.5')}`) were chosen on "
            "each fold's validation bags only; test bags were used for nothing but the "
            "numbers below."
        )
    names = ", ".join(f"r{r['repeat']}_f{r['fold']}" for r in without)
    return (
        f"**No validation bags** in {len(without)} of {len(results)} folds ({names}; "
        "e.g. a split column with only train and test rows): there the last epoch was "
        "kept and the decision threshold is 0.5; nothing was chosen on validation "
        "data. Test bags were used for nothing but the numbers below."
    )


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``summary.json`` and every fold's ``result.json`` of a finished run.

    Raises:
        DataError: The folder is not a finished run.
    """
    run = Path(run_dir)
    path = run / "summary.json"
    if not path.is_file():
        msg = f"{run}: no summary.json (not a finished `tiahnm train/run` folder)."
        raise DataError(msg)
    summary = _read_json(path)
    results = [_read_json(p) for p in (run / "folds").glob("*/result.json")]
    results.sort(key=lambda r: (r["repeat"], r["fold"]))
    return summary, results


__all__ = [
    "confusion_counts",
    "load_run",
    "plot_confusion",
    "plot_roc",
    "write_report",
    "write_report_safely",
]
