"""Slide- and instance-level metrics, bootstrap confidence intervals, thresholds.

Slide-level metrics of a fold come from :func:`tiahnm.training.metrics.binary_metrics`
at the threshold chosen on that fold's *validation* bags. Here are added:

* :func:`metric_table`: the same metrics for many resamples at once (vectorised
  confusion counts and a rank-based AUC), equal to scikit-learn's on every row;
* :func:`bootstrap_ci`: a seeded percentile bootstrap over slides of the pooled test
  predictions of each repeat (each prediction made at its own fold's threshold);
* :func:`instance_metrics` and :func:`instance_threshold`: patch-level AUC, average
  precision and F1, with a threshold of 0.5 or (on request) Youden's J on the
  validation bags' instance labels.

Nothing here ever sees a test label when a threshold is chosen: the threshold
functions take the validation bags only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tiahnm.training.metrics import METRICS, choose_threshold

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.data.bag import Bag

logger = logging.getLogger(__name__)

#: Instance-level metrics (present when every test bag has instance labels).
INSTANCE_METRICS = ("instance_auc", "instance_ap", "instance_f1")

#: What :func:`bootstrap_ci` resamples, written to ``summary.json``.
CI_METHOD = (
    "percentile bootstrap over slides of the pooled test predictions of each repeat "
    "(each at its fold's validation-chosen threshold); the same slide resample is "
    "applied to every repeat and the repeat means are bootstrapped"
)


def _as_2d(a: np.ndarray) -> np.ndarray:
    return a[None, :] if a.ndim == 1 else a


def metric_table(
    labels: np.ndarray, probs: np.ndarray, preds: np.ndarray
) -> dict[str, np.ndarray]:
    """Binary slide metrics for each row of ``[B, n]`` arrays (or one ``[n]`` row).

    Matches :func:`~tiahnm.training.metrics.binary_metrics` (scikit-learn with
    ``zero_division=0``): AUC and balanced accuracy are NaN for a row with one class,
    FPR is NaN for a row without negatives; precision, recall and F1 are 0 when
    undefined.

    Args:
        labels (np.ndarray): ``[B, n]`` 0/1 labels.
        probs (np.ndarray): ``[B, n]`` positive-class probabilities (for the AUC).
        preds (np.ndarray): ``[B, n]`` 0/1 predictions (for the other metrics).

    Returns:
        dict[str, np.ndarray]: One ``[B]`` array per name in
        :data:`~tiahnm.training.metrics.METRICS`.
    """
    from scipy.stats import rankdata

    y = _as_2d(np.asarray(labels)).astype(bool)
    p = _as_2d(np.asarray(probs, dtype=np.float64))
    yhat = _as_2d(np.asarray(preds)).astype(bool)
    n = y.shape[1]
    tp = (y & yhat).sum(1).astype(np.float64)
    fp = (~y & yhat).sum(1).astype(np.float64)
    fn = (y & ~yhat).sum(1).astype(np.float64)
    tn = n - tp - fp - fn
    pos, neg = tp + fn, fp + tn
    both = (pos > 0) & (neg > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(pos > 0, tp / pos, 0.0)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        fpr = np.where(neg > 0, fp / neg, math.nan)
        specificity = np.where(neg > 0, tn / neg, math.nan)
        # Mann-Whitney U with average ranks for ties (= sklearn's roc_auc_score)
        ranks = rankdata(p, axis=1, method="average")
        u = (ranks * y).sum(1) - pos * (pos + 1) / 2
        auc = np.where(both, u / (pos * neg), math.nan)
    out = {
        "auc": auc,
        "accuracy": (tp + tn) / n,
        "f1": f1,
        "balanced_accuracy": np.where(both, (recall + specificity) / 2, math.nan),
        "precision": precision,
        "recall": recall,
        "fpr": fpr,
    }
    return {k: out[k] for k in METRICS}


def _percentile_ci(values: np.ndarray, alpha: float) -> list[float | None]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [None, None]
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def pooled_predictions(
    results: Sequence[dict[str, Any]],
) -> dict[int, dict[str, np.ndarray]]:
    """Test predictions of each repeat, pooled over its folds.

    Args:
        results (Sequence[dict]): Fold results (``result.json`` content) with
            ``repeat`` and ``predictions`` (slide_id, label, probability, prediction).

    Returns:
        dict[int, dict[str, np.ndarray]]: Per repeat, ``slide_id``, ``label``,
        ``probability`` and ``prediction`` arrays sorted by slide id; ``{}`` when the
        rows hold no class probability (survival risks, regression values).
    """
    if not all("probability" in p for r in results for p in r["predictions"]):
        return {}
    rows: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault(int(r["repeat"]), []).extend(r["predictions"])
    out = {}
    for rep, preds in sorted(rows.items()):
        preds = sorted(preds, key=lambda p: str(p["slide_id"]))
        out[rep] = {
            "slide_id": np.asarray([str(p["slide_id"]) for p in preds]),
            "label": np.asarray([int(p["label"]) for p in preds], dtype=np.int64),
            "probability": np.asarray(
                [float(p["probability"]) for p in preds], dtype=np.float64
            ),
            "prediction": np.asarray(
                [int(p["prediction"]) for p in preds], dtype=np.int64
            ),
        }
    return out


def bootstrap_ci(
    pooled: dict[int, dict[str, np.ndarray]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Point estimates and percentile bootstrap CIs of the slide metrics.

    The point estimate of a metric is its value on the pooled test predictions of a
    repeat, averaged over repeats. A resample draws ``n`` slides with replacement;
    when every repeat tested the same slides (k-fold CV) the same draw is used in
    every repeat (the repeats share their slides, so drawing them independently would
    understate the spread), otherwise each repeat is drawn on its own.

    Args:
        pooled (dict): Output of :func:`pooled_predictions` (binary labels).
        n_resamples (int): Bootstrap resamples.
        seed (int): Seed of the resampling (same seed, same interval).
        alpha (float): ``1 - alpha`` is the coverage (0.05: 95%).

    Returns:
        dict[str, dict]: Per metric ``{"pooled": float, "ci95": [lo, hi]}``.
    """
    if not pooled:
        return {}
    import warnings

    rng = np.random.default_rng(seed)
    reps = [r for r in pooled.values() if len(r["label"])]
    if not reps:
        return {}
    points = [metric_table(r["label"], r["probability"], r["prediction"]) for r in reps]
    ids = [tuple(r["slide_id"]) for r in reps]
    shared = None
    if all(i == ids[0] for i in ids):
        n = len(ids[0])
        shared = rng.integers(0, n, size=(n_resamples, n))
    per_rep = []
    for r in reps:
        n = len(r["label"])
        idx = shared if shared is not None else rng.integers(0, n, (n_resamples, n))
        per_rep.append(
            metric_table(r["label"][idx], r["probability"][idx], r["prediction"][idx])
        )
    out: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        for k in METRICS:
            point = float(np.nanmean([p[k][0] for p in points]))
            means = np.nanmean(np.stack([m[k] for m in per_rep]), axis=0)  # [B]
            out[k] = {
                "pooled": None if math.isnan(point) else point,
                "ci95": _percentile_ci(means, alpha),
            }
    return out


def confidence_intervals(
    results: Sequence[dict[str, Any]], *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """:func:`bootstrap_ci` of fold results (binary tasks; ``{}`` otherwise)."""
    if n_resamples <= 0 or not results:
        return {}
    pooled = pooled_predictions(results)
    if not pooled:
        return {}
    labels = np.concatenate([p["label"] for p in pooled.values()])
    if labels.size == 0 or labels.max() > 1:
        return {}
    return bootstrap_ci(pooled, n_resamples=n_resamples, seed=seed)


def add_confidence_intervals(
    summary: dict[str, Any],
    results: Sequence[dict[str, Any]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Add ``metrics.<name>.pooled`` and ``.ci95`` (and ``ci``) to a run summary.

    Args:
        summary (dict): The summary of :func:`tiahnm.crossval.summarise`
            (changed in place).
        results (Sequence[dict]): The fold results.
        n_resamples (int): Bootstrap resamples (0: no CI).
        seed (int): Seed of the resampling.

    Returns:
        dict: ``summary``.
    """
    cis = confidence_intervals(results, n_resamples=n_resamples, seed=seed)
    if not cis:
        return summary
    for name, value in cis.items():
        if name in summary.get("metrics", {}):
            summary["metrics"][name].update(value)
    summary["ci"] = {
        "method": CI_METHOD,
        "level": 0.95,
        "n_resamples": n_resamples,
        "seed": seed,
    }
    return summary


def instance_threshold(
    val_bags: Sequence[Bag], val_scores: Sequence[np.ndarray] | None, rule: str
) -> float:
    """Instance decision threshold, chosen on *validation* bags only.

    Args:
        val_bags (Sequence[Bag]): The fold's validation bags.
        val_scores (Sequence[np.ndarray] | None): Their instance scores.
        rule (str): ``"0.5"`` (default) or ``"youden"``: Youden's J of the
            validation bags' instance scores against their instance labels (0.5 when
            they have no instance labels or a single class).

    Returns:
        float: The threshold.
    """
    if rule == "0.5":
        return 0.5
    if (
        val_scores is None
        or not val_bags
        or any(b.instance_labels is None for b in val_bags)
    ):
        if rule != "youden":
            return choose_threshold([], [], rule)  # raises on an unknown rule
        return 0.5
    y = np.concatenate([np.asarray(b.instance_labels) for b in val_bags])
    s = np.concatenate([np.asarray(v, dtype=np.float64) for v in val_scores])
    return choose_threshold((y > 0).astype(int).tolist(), s, rule)


def instance_metrics(
    bags: Sequence[Bag], scores: Sequence[np.ndarray] | None, threshold: float = 0.5
) -> dict[str, float]:
    """Instance AUC, average precision and F1 (at ``threshold``) over all test patches.

    Args:
        bags (Sequence[Bag]): Test bags (each with ``instance_labels``).
        scores (Sequence[np.ndarray] | None): Their instance scores (the head's
            ``default_eval_score``).
        threshold (float): Instance threshold (from :func:`instance_threshold`).

    Returns:
        dict[str, float]: ``instance_auc``, ``instance_ap``, ``instance_f1`` (AUC and
        AP are NaN with a single class); ``{}`` when labels or scores are missing.
    """
    if (
        scores is None
        or not bags
        or any(b.instance_labels is None for b in bags)
        or len(scores) != len(bags)
    ):
        return {}
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    y = (np.concatenate([np.asarray(b.instance_labels) for b in bags]) > 0).astype(int)
    s = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in scores])
    if y.shape != s.shape:
        return {}
    two = len(np.unique(y)) == 2
    return {
        "instance_auc": float(roc_auc_score(y, s)) if two else math.nan,
        "instance_ap": float(average_precision_score(y, s)) if y.any() else math.nan,
        "instance_f1": float(f1_score(y, s >= threshold, zero_division=0)),
    }


__all__ = [
    "CI_METHOD",
    "INSTANCE_METRICS",
    "add_confidence_intervals",
    "bootstrap_ci",
    "confidence_intervals",
    "instance_metrics",
    "instance_threshold",
    "metric_table",
    "pooled_predictions",
]
