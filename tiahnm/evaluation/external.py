"""Score a trained run on a labelled external cohort (``tiahnm evaluate``).

The run's fold heads form an ensemble (their task outputs averaged, the decision
threshold the mean of the validation-chosen fold thresholds, as ``tiahnm predict``).
The cohort is a features folder and a labels CSV read like the run's ``h5_folder``
data (its class names, patient, time and event columns; ``data.bag_level``). The
task's metrics with percentile-bootstrap 95% CIs are computed over slides and, when
the CSV has patients, over patients (mean slide output per patient). Written in the
output folder (atomically): ``summary.json``, ``predictions.csv`` (``patient_id``
when known), ``instance_scores.h5`` (for ``tiahnm heatmap``), ``report.md`` with the
task's sections (Kaplan-Meier curves, confusion matrix). Nothing outside the run
folder, the features folder and the labels CSV is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.errors import DataError
from tiahnm.utils.io import atomic_open, write_json

#: Metrics bootstrapped for binary runs (the other tasks name theirs).
BINARY_CI_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def run_data_options(run_dir: str | Path) -> tuple[dict[str, Any], str]:
    """``data.options`` and ``data.bag_level`` of the run's ``config.yaml``."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        msg = f"{run_dir}: no config.yaml (give a `tiahnm train/run` output folder)."
        raise DataError(msg)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data = cfg.get("data") or {}
    return dict(data.get("options") or {}), str(data.get("bag_level") or "slide")


def load_cohort(
    run_dir: str | Path, labels_csv: str | Path, features_dir: str | Path
) -> list[Any]:
    """The cohort's bags, read with the run's class names and cohort columns."""
    from tiahnm.data.cohort import check_patient_labels, patient_bags
    from tiahnm.data.h5_features import H5FeatureFolder

    options, bag_level = run_data_options(run_dir)
    keep = ("classes", "patient_column", "time_column", "event_column")
    source = H5FeatureFolder(
        features_dir,
        labels_csv,
        **{k: options[k] for k in keep if options.get(k) is not None},
    )
    source.require_all_classes = False  # an external cohort may lack a class
    bags = source.load()
    check_patient_labels(bags)
    return patient_bags(bags) if bag_level == "patient" else bags


def _ci_names(task: Any) -> tuple[str, ...]:
    return tuple(task.ci_metrics) if task.ci_metrics else BINARY_CI_METRICS


def metrics_with_ci(
    task: Any,
    targets: Sequence[Any],
    outputs: np.ndarray,
    threshold: float,
    *,
    n_resamples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """``{metric: {"value", "ci95"}}``: the task's metrics, CIs by bootstrap."""
    from tiahnm.tasks.evaluate import bootstrap_task_ci

    point = task.metrics(targets, outputs, threshold)
    out = {
        k: {"value": None if math.isnan(v) else float(v)}
        for k, v in point.items()
        if isinstance(v, float | int)
    }
    if n_resamples > 0 and len(targets):
        rows = task.prediction_rows(targets, outputs, threshold)
        results = [{"repeat": 0, "fold": 0, "predictions": rows}]
        cis = bootstrap_task_ci(
            task,
            results,
            n_resamples=n_resamples,
            seed=seed,
            names=_ci_names(task),
            threshold=threshold,
        )
        for k, v in cis.items():
            out.setdefault(k, {"value": None})["ci95"] = v["ci95"]
    return out


def predict_bags(heads: Sequence[Any], bags: Sequence[Any], task: Any, device: Any):
    """Ensemble outputs ``[n, W]``, instance scores and class scores per bag."""
    from tiahnm.evaluation.predict import ensemble_predict

    outputs, scores, per_class = [], [], []
    for b in bags:
        o, s, c = ensemble_predict(heads, b.features.float(), device, task)
        outputs.append(o)
        scores.append(s)
        per_class.append(c)
    width = outputs[0].shape[0] if outputs else 0
    return np.asarray(outputs, dtype=np.float64).reshape(-1, width), scores, per_class


def evaluate_cohort(
    run_dir: str | Path,
    labels_csv: str | Path,
    features_dir: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score run ``run_dir`` on a labelled cohort; write and return ``summary.json``.

    Args:
        run_dir (str | Path): A finished training run (``folds/*/best.pt``).
        labels_csv (str | Path): The cohort's labels CSV (as the run's: slide_id,
            label or time/event, optional patient column).
        features_dir (str | Path): Its ``<slide_id>.h5`` feature files (made with
            the run's encoder).
        output_dir (str | Path): Output folder (created).
        device (str): Device of the heads.
        n_resamples (int): Bootstrap resamples of the CIs (0: none).
        seed (int): Seed of the resampling.

    Raises:
        DataError: Unusable run, labels or features (naming the file and row).
    """
    from tiahnm.evaluation.predict import heads_task, load_heads
    from tiahnm.runtime.device import resolve_device
    from tiahnm.tasks.classification import group_outputs

    out = Path(output_dir)
    dev = resolve_device(device, "--device")
    heads = load_heads(run_dir, dev)
    if Path(run_dir).is_file():
        msg = f"{run_dir}: give the training run folder (its config.yaml is needed)."
        raise DataError(msg)
    task = heads_task(heads)
    bags = load_cohort(run_dir, labels_csv, features_dir)
    if task.name != "multiclass":  # (a cohort may lack a class: no check there)
        task.check_bags(bags)
    threshold = float(np.mean([h.threshold for h in heads]))
    outputs, scores, per_class = predict_bags(heads, bags, task, dev)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "run": str(run_dir),
        "labels_csv": str(labels_csv),
        "features_dir": str(features_dir),
        "checkpoints": [str(h.path) for h in heads],
        "task": task.describe(),
        "task_spec": task.spec(),
        "threshold": threshold,
        "n_bags": len(bags),
        "metrics": metrics_with_ci(
            task, bags, outputs, threshold, n_resamples=n_resamples, seed=seed
        ),
    }
    if any(b.patient_id for b in bags):
        targets, merged = group_outputs(bags, outputs)
        summary["n_patients"] = len(targets)
        summary["patient_metrics"] = metrics_with_ci(
            task, targets, merged, threshold, n_resamples=n_resamples, seed=seed
        )
    if n_resamples > 0:
        summary["ci"] = {
            "method": "percentile bootstrap over slides (patients for "
            "patient_metrics) of the cohort",
            "level": 0.95,
            "n_resamples": n_resamples,
            "seed": seed,
        }
    rows = _rows(task, bags, outputs, threshold)
    result = {"repeat": 0, "fold": 0, "predictions": rows}
    result.update(task.fold_extras(bags, outputs, threshold))
    summary.update({k: v for k, v in result.items() if k == "confusion_matrix"})
    _write_outputs(
        out, summary, result, task, heads, (bags, outputs, scores, per_class)
    )
    return summary


def _rows(
    task: Any, bags: Sequence[Any], outputs: np.ndarray, threshold: float
) -> list[dict[str, Any]]:
    rows = task.prediction_rows(bags, outputs, threshold)
    if any(b.patient_id for b in bags):
        for row, b in zip(rows, bags, strict=True):
            row["patient_id"] = b.patient_id or ""
    for row, b in zip(rows, bags, strict=True):
        row["n_patches"] = b.n_instances
    return rows


def _write_outputs(
    out: Path,
    summary: dict[str, Any],
    result: dict[str, Any],
    task: Any,
    heads: Sequence[Any],
    predicted: tuple[Sequence[Any], np.ndarray, Sequence[Any], Sequence[Any]],
) -> None:
    """summary.json, predictions.csv, instance_scores.h5 and report.md."""
    from tiahnm.evaluation.scores import (
        SCORES_FILE,
        scores_from_bags,
        write_instance_scores,
    )
    from tiahnm.tasks.evaluate import write_predictions_csv

    bags, outputs, scores, per_class = predicted
    write_json(out / "summary.json", summary)
    write_predictions_csv(out / "predictions.csv", [result])
    keep = [i for i, s in enumerate(scores) if s is not None]
    if keep:
        has_class = all(per_class[i] is not None for i in keep)
        slides = scores_from_bags(
            [bags[i] for i in keep],
            [scores[i] for i in keep],
            outputs[keep],
            summary["threshold"],
            task=task,
            class_scores=[per_class[i] for i in keep] if has_class else None,
        )
        write_instance_scores(
            out / SCORES_FILE,
            slides,
            {
                "slide_score": task.score_name,
                "score_kind": heads[0].head.default_eval_score,
                "head": type(heads[0].head).__name__,
                "threshold": summary["threshold"],
                "instance_threshold": float(
                    np.mean([h.instance_threshold for h in heads])
                ),
            },
        )
    write_cohort_report(out, summary, [result], task)


def _metric_table(metrics: dict[str, dict[str, Any]], keys: Sequence[str]) -> list[str]:
    rows = ["| metric | value | 95% CI |", "|---|---|---|"]
    for k in keys:
        m = metrics.get(k)
        if not m:
            continue
        ci = m.get("ci95")
        ci_text = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
        rows.append(f"| {k} | {_fmt(m.get('value'))} | {ci_text} |")
    return rows


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def write_cohort_report(
    out: Path, summary: dict[str, Any], results: Sequence[dict[str, Any]], task: Any
) -> Path:
    """``report.md`` of an external-cohort evaluation."""
    keys = list(task.report_metrics)
    n_heads = len(summary["checkpoints"])
    lines = [
        f"# External cohort: {summary['labels_csv']}",
        "",
        f"Run {summary['run']} ({'ensemble of ' + str(n_heads) + ' fold heads' if n_heads > 1 else '1 head'}"
        f"), task {task.name}; {summary['n_bags']} bags"
        + (f", {summary['n_patients']} patients" if "n_patients" in summary else "")
        + f". Decision threshold / risk cut {summary['threshold']:.4g}: the mean of "
        "the fold thresholds chosen on their validation bags (nothing was chosen on "
        "this cohort).",
        "",
        "## Slide-level metrics",
        "",
        *_metric_table(summary["metrics"], keys),
        "",
    ]
    if "patient_metrics" in summary:
        lines += [
            "## Patient-level metrics (mean slide output per patient)",
            "",
            *_metric_table(summary["patient_metrics"], keys),
            "",
        ]
    if "ci" in summary:
        lines += [
            f"95% CI: {summary['ci']['method']}; {summary['ci']['n_resamples']} "
            f"resamples, seed {summary['ci']['seed']}.",
            "",
        ]
    lines += task.report_sections(out, results, {"metrics": _as_mean(summary)})
    path = out / "report.md"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path


def _as_mean(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cohort metrics in the ``{mean, std}`` form of a CV summary."""
    return {
        k: {"mean": v.get("value"), "std": None} for k, v in summary["metrics"].items()
    }


__all__ = [
    "BINARY_CI_METRICS",
    "evaluate_cohort",
    "load_cohort",
    "metrics_with_ci",
    "write_cohort_report",
]
