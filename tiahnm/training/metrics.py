"""Slide-level metrics and threshold selection (validation data only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tiahnm.tasks.binary_metrics import binary_metrics, choose_threshold

METRICS = ("auc", "accuracy", "f1", "balanced_accuracy", "precision", "recall", "fpr")


def aggregate(
    rows: Sequence[dict[str, float]], keys: Sequence[str] = METRICS
) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each metric over rows (NaNs ignored)."""
    out = {}
    for key in keys:
        values = np.asarray([r[key] for r in rows if key in r], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            out[key] = {"mean": math.nan, "std": math.nan, "n": 0}
            continue
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        out[key] = {"mean": float(values.mean()), "std": std, "n": int(values.size)}
    return out


__all__ = ["METRICS", "aggregate", "binary_metrics", "choose_threshold"]
