"""Task-generic evaluation: patient-level metrics, bootstrap CIs, predictions.csv."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.tasks.base import Task
from tiahnm.tasks.classification import group_outputs

#: What :func:`task_confidence_intervals` resamples, written to ``summary.json``.
TASK_CI_METHOD = (
    "percentile bootstrap over slides of the pooled test predictions of each repeat; "
    "the same slide resample is applied to every repeat and the repeat means are "
    "bootstrapped"
)


def fold_patient_metrics(
    task: Task, bags: Sequence[Any], outputs: np.ndarray, threshold: float
) -> dict[str, float]:
    """The task's metrics per patient (mean slide output); ``{}`` without patients."""
    if not any(getattr(b, "patient_id", None) for b in bags) or not len(bags):
        return {}
    targets, merged = group_outputs(bags, outputs)
    return task.metrics(targets, merged, threshold)


def pooled_rows(results: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Prediction rows of each repeat pooled over its folds, sorted by slide id."""
    rows: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault(int(r["repeat"]), []).extend(r["predictions"])
    return {
        k: sorted(v, key=lambda p: str(p["slide_id"])) for k, v in sorted(rows.items())
    }


def bootstrap_task_ci(
    task: Task,
    results: Sequence[dict[str, Any]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    names: Sequence[str] | None = None,
    threshold: float = math.nan,
) -> dict[str, dict[str, Any]]:
    """Pooled point estimates and percentile bootstrap CIs of ``task.ci_metrics``.

    ``names`` overrides ``task.ci_metrics``; ``threshold`` is passed to
    ``task.metrics`` (for thresholded binary metrics of one cohort).

    As :func:`tiahnm.evaluation.metrics.bootstrap_ci`: the point estimate is the
    metric of each repeat's pooled predictions, averaged over repeats; a resample
    draws slides with replacement (the same draw in every repeat when they share
    their slides).
    """
    names = tuple(names) if names is not None else (task.ci_metrics or ())
    reps = [task.from_rows(rows) for rows in pooled_rows(results).values() if rows]
    if not reps or not names:
        return {}
    rng = np.random.default_rng(seed)
    n = len(reps[0][0])
    shared = all(len(t) == n for t, _ in reps)
    idx_shared = rng.integers(0, n, size=(n_resamples, n)) if shared else None
    points = [task.metrics(t, o, threshold) for t, o in reps]
    draws: list[list[dict[str, float]]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t, o in reps:
            idx = (
                idx_shared
                if idx_shared is not None
                else rng.integers(0, len(t), (n_resamples, len(t)))
            )
            draws.append(
                [task.metrics([t[j] for j in row], o[row], threshold) for row in idx]
            )
        out = {}
        for k in names:
            point = float(np.nanmean([p.get(k, math.nan) for p in points]))
            per = np.asarray([[d[k] for d in rep] for rep in draws], dtype=np.float64)
            means = np.nanmean(per, axis=0)
            means = means[~np.isnan(means)]
            ci = (
                [
                    float(v)
                    for v in np.percentile(
                        means, [100 * alpha / 2, 100 * (1 - alpha / 2)]
                    )
                ]
                if means.size
                else [None, None]
            )
            out[k] = {"pooled": None if math.isnan(point) else point, "ci95": ci}
    return out


def task_confidence_intervals(
    task: Task,
    summary: dict[str, Any],
    results: Sequence[dict[str, Any]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Add ``metrics.<name>.pooled`` / ``.ci95`` and ``ci`` to ``summary`` (in place)."""
    if n_resamples <= 0 or not results:
        return summary
    cis = bootstrap_task_ci(task, results, n_resamples=n_resamples, seed=seed)
    for name, value in cis.items():
        if name in summary.get("metrics", {}):
            summary["metrics"][name].update(value)
    if cis:
        summary["ci"] = {
            "method": TASK_CI_METHOD,
            "level": 0.95,
            "n_resamples": n_resamples,
            "seed": seed,
        }
    return summary


def write_predictions_csv(path: str | Path, results: Sequence[dict[str, Any]]) -> None:
    """``predictions.csv``: slide_id, repeat, fold, then the task's row columns.

    For binary tasks the columns are ``slide_id, repeat, fold, label, probability,
    prediction`` as before; floats are written with 6 decimals.
    """
    from tiahnm.utils.io import atomic_open

    columns: list[str] = []
    for r in results:
        for p in r["predictions"]:
            columns += [k for k in p if k != "slide_id" and k not in columns]
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "repeat", "fold", *columns])
        for r in results:
            for p in r["predictions"]:
                w.writerow(
                    [p["slide_id"], r["repeat"], r["fold"]]
                    + [_fmt(p.get(k, "")) for k in columns]
                )


def _fmt(value: Any) -> Any:
    return f"{value:.6f}" if isinstance(value, float) else value


__all__ = [
    "bootstrap_task_ci",
    "fold_patient_metrics",
    "pooled_rows",
    "task_confidence_intervals",
    "write_predictions_csv",
]
