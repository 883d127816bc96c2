"""Precision-recall and calibration (reliability) curves of pooled test predictions.

Companions of :func:`tiahnm.evaluation.report.plot_roc`; each returns None when no
repeat has both classes (binary tasks only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiahnm.evaluation.report import _new_figure, _save


def _binary(pooled: dict[int, dict[str, np.ndarray]]) -> list[tuple[int, dict]]:
    out = []
    for rep, p in pooled.items():
        y = p["label"]
        if len(np.unique(y)) == 2 and y.max() <= 1:
            out.append((rep, p))
    return out


def plot_pr(pooled: dict[int, dict[str, np.ndarray]], path: str | Path) -> Path | None:
    """Precision-recall curve (and average precision) of each repeat's test slides."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    reps = _binary(pooled)
    if not reps:
        return None
    fig = _new_figure(4.6, 4.4)
    ax = fig.add_subplot()
    for rep, p in reps:
        prec, rec, _ = precision_recall_curve(p["label"], p["probability"])
        ap = average_precision_score(p["label"], p["probability"])
        ax.step(rec, prec, where="post", lw=1.6, label=f"repeat {rep}: AP {ap:.3f}")
    base = float(np.mean(reps[0][1]["label"]))
    ax.axhline(base, ls="--", color="0.6", lw=1, label=f"prevalence {base:.2f}")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title="Precision-recall, pooled test predictions",
    )
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def calibration_bins(
    labels: np.ndarray, probs: np.ndarray, n_bins: int = 5
) -> list[tuple[float, float, int]]:
    """``(mean probability, fraction positive, count)`` of equal-width bins."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            out.append(
                (float(probs[sel].mean()), float(labels[sel].mean()), int(sel.sum()))
            )
    return out


def plot_calibration(
    pooled: dict[int, dict[str, np.ndarray]],
    path: str | Path,
    *,
    n_bins: int = 5,
    positive: str = "class 1",
) -> Path | None:
    """Reliability diagram: observed fraction positive against mean probability."""
    reps = _binary(pooled)
    if not reps:
        return None
    fig = _new_figure(4.6, 4.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfectly calibrated")
    for rep, p in reps:
        bins = calibration_bins(p["label"], p["probability"].astype(float), n_bins)
        x, y, n = (np.array(v) for v in zip(*bins, strict=True))
        ax.plot(x, y, marker="o", lw=1.4, label=f"repeat {rep}")
        for xi, yi, ni in zip(x, y, n, strict=True):
            ax.annotate(
                str(ni),
                (xi, yi),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel=f"mean predicted p({positive})",
        ylabel=f"fraction {positive}",
        title=f"Calibration ({n_bins} bins; slides per bin)",
    )
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


__all__ = ["calibration_bins", "plot_calibration", "plot_pr"]
