"""Binary slide metrics and the validation threshold rule (used by the tasks).

Re-exported by :mod:`tiahnm.training.metrics`; kept here so that the task layer
(:mod:`tiahnm.tasks`) depends on nothing above it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def choose_threshold(labels: Sequence[int], probs: Sequence[float], rule: str) -> float:
    """Decision threshold from *validation* labels and probabilities.

    Args:
        labels (Sequence[int]): Binary labels of the validation bags.
        probs (Sequence[float]): Positive-class probabilities.
        rule (str): ``"0.5"`` or ``"youden"`` (maximises ``tpr - fpr``; falls back to
            0.5 when the validation set has a single class).
    """
    if rule == "0.5":
        return 0.5
    if rule != "youden":
        msg = f"Unknown threshold rule {rule!r}; use '0.5' or 'youden'."
        raise ValueError(msg)
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return 0.5
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, np.asarray(probs, dtype=np.float64))
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], 1.0))


def binary_metrics(
    labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5
) -> dict[str, float]:
    """AUC, accuracy, F1, balanced accuracy, precision, recall and false-positive rate.

    A metric that is undefined for the inputs (AUC with one class) is NaN. Predictions
    are ``prob >= threshold``.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    pred = (p >= threshold).astype(np.int64)
    out = {
        "auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan,
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred))
        if len(np.unique(y)) == 2
        else math.nan,
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
    }
    negatives = y == 0
    out["fpr"] = float(pred[negatives].mean()) if negatives.any() else math.nan
    return out


__all__ = ["binary_metrics", "choose_threshold"]
