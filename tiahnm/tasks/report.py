"""Report sections of the multi-class and survival tasks (markdown lines and PNGs).

Survival: Kaplan-Meier curves of the high- and low-risk groups of the pooled test
predictions (each fold's risk cut is the median of its *validation* risks) with the
log-rank p-value, both from scikit-survival; the plot is drawn with matplotlib's Agg
canvas. Multi-class: per-class AUC and recall, and the confusion matrix summed over
folds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The Kaplan-Meier figure written in the run folder.
KM_FILE = "km.png"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def first_repeat_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Test prediction rows of the first repeat (each slide once)."""
    if not results:
        return []
    first = min(int(r["repeat"]) for r in results)
    return [p for r in results if int(r["repeat"]) == first for p in r["predictions"]]


def kaplan_meier_groups(
    time: np.ndarray, event: np.ndarray, high: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Kaplan-Meier estimate per risk group: ``{name: (times, survival, n)}``."""
    from sksurv.nonparametric import kaplan_meier_estimator

    out = {}
    for name, mask in (("low risk", ~high), ("high risk", high)):
        if mask.sum() == 0:
            continue
        t, s = kaplan_meier_estimator(event[mask].astype(bool), time[mask])
        out[name] = (np.asarray(t), np.asarray(s), int(mask.sum()))
    return out


def plot_kaplan_meier(
    rows: Sequence[dict[str, Any]], path: str | Path
) -> tuple[Path | None, float]:
    """``km.png`` of the ``high_risk`` groups of ``rows``; returns (path, log-rank p).

    Returns ``(None, nan)`` when a group is empty or there is no event.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tiahnm.tasks.survival import logrank_p
    from tiahnm.utils.io import atomic_path

    time = np.asarray([float(r["time"]) for r in rows], dtype=np.float64)
    event = np.asarray([int(r["event"]) for r in rows], dtype=np.int64)
    high = np.asarray([int(r["high_risk"]) for r in rows], dtype=bool)
    p = logrank_p(time, event, high)
    if math.isnan(p):
        return None, p
    fig = Figure(figsize=(5.0, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (t, s, n) in kaplan_meier_groups(time, event, high).items():
        ax.step(
            np.concatenate([[0.0], t]),
            np.concatenate([[1.0], s]),
            where="post",
            lw=1.8,
            color="tab:red" if name == "high risk" else "tab:blue",
            label=f"{name} (n = {n})",
        )
    ax.set(
        ylim=(-0.02, 1.02),
        xlabel="time",
        ylabel="survival probability",
        title=f"Kaplan-Meier, test predictions (log-rank p = {p:.2g})",
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path, p


def survival_sections(run_dir: Any, results: Sequence[dict[str, Any]]) -> list[str]:
    """The Kaplan-Meier section of a survival run's report."""
    rows = first_repeat_rows(results)
    if not rows or run_dir is None:
        return []
    png, p = plot_kaplan_meier(rows, Path(run_dir) / KM_FILE)
    lines = [
        "## Risk groups (Kaplan-Meier)",
        "",
        f"Test predictions of the first repeat ({len(rows)} bags), split into high and "
        "low risk at each fold's cut: the median risk of that fold's *validation* "
        "bags. Kaplan-Meier estimates and the log-rank test: scikit-survival.",
        "",
    ]
    if png is None:
        return [*lines, "No curve: a risk group is empty or there is no event.", ""]
    return [
        *lines,
        f"Log-rank p = {p:.3g}.",
        "",
        f"![Kaplan-Meier curves of the risk groups]({KM_FILE})",
        "",
    ]


def summed_confusion(results: Sequence[dict[str, Any]]) -> np.ndarray | None:
    """Confusion matrices of the folds (``confusion_matrix``) summed; None if none."""
    mats = [
        np.asarray(r["confusion_matrix"]) for r in results if "confusion_matrix" in r
    ]
    if not mats:
        return None
    return np.sum(mats, axis=0)


def multiclass_sections(
    task: Any, results: Sequence[dict[str, Any]], summary: dict[str, Any]
) -> list[str]:
    """Per-class AUC / recall and the confusion matrix of a multi-class run."""
    metrics = summary.get("metrics", {})
    n = 0
    while f"auc_class{n}" in metrics or f"recall_class{n}" in metrics:
        n += 1
    lines = []
    if n:
        lines += [
            "## Per class (one-vs-rest), mean ± std over folds",
            "",
            "| class | AUC | recall |",
            "|---|---|---|",
        ]
        for k in range(n):
            auc = metrics.get(f"auc_class{k}", {})
            rec = metrics.get(f"recall_class{k}", {})
            lines.append(
                f"| {k} | {_fmt(auc.get('mean'))} ± {_fmt(auc.get('std'))} "
                f"| {_fmt(rec.get('mean'))} ± {_fmt(rec.get('std'))} |"
            )
        weights = "quadratic" if getattr(task, "ordinal", False) else "no"
        lines += [
            "",
            f"`auc` is the macro one-vs-rest AUC; `accuracy` the fraction correct, "
            f"`balanced_accuracy` the mean per-class recall; Cohen's kappa with "
            f"{weights} weights.",
            "",
        ]
    cm = summed_confusion(results)
    if cm is not None:
        header = " | ".join(f"pred {j}" for j in range(cm.shape[1]))
        lines += [
            "## Confusion matrix (test folds summed; rows: label)",
            "",
            f"| label | {header} |",
            "|---|" + "---|" * cm.shape[1],
        ]
        lines += [
            f"| {i} | " + " | ".join(str(int(v)) for v in row) + " |"
            for i, row in enumerate(cm)
        ]
        lines.append("")
    return lines


__all__ = [
    "KM_FILE",
    "first_repeat_rows",
    "kaplan_meier_groups",
    "multiclass_sections",
    "plot_kaplan_meier",
    "summed_confusion",
]
