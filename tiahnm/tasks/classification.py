"""Classification tasks: ``binary`` (today's behaviour) and ``multiclass``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tiahnm.errors import DataError
from tiahnm.tasks.base import Task
from tiahnm.tasks.binary_metrics import binary_metrics, choose_threshold


@dataclass
class Target:
    """The label part of a bag (also of a patient made of several bags)."""

    slide_id: str
    label: int
    time: float | None = None
    event: int | None = None
    patient_id: str | None = None
    target: float | None = None


def group_outputs(
    bags: Sequence[Any], outputs: np.ndarray
) -> tuple[list[Target], np.ndarray]:
    """Bags merged per ``patient_id``: the mean output and the shared label.

    Bags without a patient are their own group. Conflicting labels within a patient
    are checked when the data is read (:mod:`tiahnm.data.cohort`).
    """
    order: dict[str, list[int]] = {}
    for i, b in enumerate(bags):
        key = b.patient_id if getattr(b, "patient_id", None) else b.slide_id
        order.setdefault(str(key), []).append(i)
    targets, merged = [], []
    for key, idx in order.items():
        first = bags[idx[0]]
        targets.append(
            Target(
                key,
                int(first.label),
                first.time,
                first.event,
                patient_id=key,
                target=first.target,
            )
        )
        merged.append(outputs[idx].mean(0))
    width = outputs.shape[1] if outputs.ndim == 2 else 0
    return targets, np.asarray(merged, dtype=np.float64).reshape(-1, width)


class BinaryTask(Task):
    """Two classes: cross-entropy, AUC / accuracy / F1 ..., threshold 0.5 or Youden."""

    name = "binary"

    def check_bags(self, bags: Sequence[Any]) -> None:
        """Labels must be 0 or 1."""
        for b in bags:
            if b.label not in (0, 1):
                msg = f"{b.source or 'data'}: bag {b.slide_id!r} has label {b.label}; task 'binary' needs 0/1."
                raise DataError(msg)

    def threshold(
        self, val_bags: Sequence[Any], val_outputs: np.ndarray, rule: str
    ) -> float:
        """0.5 or Youden's J on the validation bags."""
        if not val_bags:
            return 0.5
        return choose_threshold([b.label for b in val_bags], val_outputs[:, 1], rule)

    def metrics(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> dict[str, float]:
        """:func:`~tiahnm.training.metrics.binary_metrics` at ``threshold``."""
        return binary_metrics([b.label for b in bags], outputs[:, 1], threshold)

    def val_row(
        self, val_bags: Sequence[Any], val_outputs: np.ndarray
    ) -> dict[str, float]:
        """``val_auc`` and ``val_acc`` at 0.5."""
        vm = binary_metrics([b.label for b in val_bags], val_outputs[:, 1])
        return {"val_auc": vm["auc"], "val_acc": vm["accuracy"]}

    def prediction_rows(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> list[dict[str, Any]]:
        """slide_id, label, probability (class 1), prediction."""
        return [
            {
                "slide_id": b.slide_id,
                "label": b.label,
                "probability": float(outputs[i, 1]),
                "prediction": int(outputs[i, 1] >= threshold),
            }
            for i, b in enumerate(bags)
        ]

    def from_rows(self, rows: Sequence[dict[str, Any]]) -> tuple[list[Any], np.ndarray]:
        """Targets and ``[n, 2]`` probabilities."""
        p = np.asarray([float(r["probability"]) for r in rows], dtype=np.float64)
        return _targets(rows), np.stack([1.0 - p, p], axis=1)


class MulticlassTask(Task):
    """C > 2 classes: macro one-vs-rest AUC, per-class AUC and recall, kappa ...

    Args:
        ordinal (bool): Classes are ordered grades: Cohen's kappa uses quadratic
            weights (otherwise unweighted).
    """

    name = "multiclass"
    per_class_instance_scores = True

    def __init__(self, *, ordinal: bool = False) -> None:
        self.ordinal = bool(ordinal)

    def check_bags(self, bags: Sequence[Any]) -> None:
        """Every class index ``0..C-1`` must have a bag (a class with none is an error)."""
        present = {int(b.label) for b in bags}
        n_classes = max(present) + 1 if present else 0
        absent = [k for k in range(n_classes) if k not in present]
        if absent:
            where = bags[0].meta.get("labels_csv") or bags[0].source or "data"
            msg = (
                f"{where}: class {absent[0]} has no bag (labels are class indices "
                f"0..{n_classes - 1}; classes without bags: {absent}); relabel the "
                "classes 0..K-1 or list data.options.classes."
            )
            raise DataError(msg)

    def metrics(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> dict[str, float]:
        """:func:`multiclass_metrics` (argmax predictions; no threshold)."""
        return multiclass_metrics(
            [b.label for b in bags], outputs, ordinal=self.ordinal
        )

    def val_row(
        self, val_bags: Sequence[Any], val_outputs: np.ndarray
    ) -> dict[str, float]:
        """``val_auc`` (macro one-vs-rest) and ``val_acc``."""
        m = multiclass_metrics([b.label for b in val_bags], val_outputs, ordinal=False)
        return {"val_auc": m["auc"], "val_acc": m["accuracy"]}

    def prediction_rows(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> list[dict[str, Any]]:
        """slide_id, label, probability (of the predicted class), prediction, p_<k>."""
        rows = []
        for i, b in enumerate(bags):
            row = {
                "slide_id": b.slide_id,
                "label": b.label,
                "probability": float(outputs[i].max()),
                "prediction": int(outputs[i].argmax()),
            }
            row.update({f"p_{k}": float(v) for k, v in enumerate(outputs[i])})
            rows.append(row)
        return rows

    ci_metrics = ("auc", "accuracy", "balanced_accuracy", "f1", "kappa")

    def from_rows(self, rows: Sequence[dict[str, Any]]) -> tuple[list[Any], np.ndarray]:
        """Targets and ``[n, C]`` probabilities from the ``p_<k>`` columns."""
        n = sum(1 for k in rows[0] if k.startswith("p_")) if rows else 0
        probs = [[float(r[f"p_{k}"]) for k in range(n)] for r in rows]
        return _targets(rows), np.asarray(probs, dtype=np.float64).reshape(-1, n)

    def spec(self) -> dict[str, Any]:
        """Name and ``ordinal``."""
        return {"name": self.name, "options": {"ordinal": self.ordinal}}

    def check_class_names(self, class_names: Sequence[str], where: str) -> None:
        """ConfigError when ``ordinal`` is set and the class names are not integers."""
        from tiahnm.errors import ConfigError

        if not self.ordinal:
            return
        bad = [c for c in class_names if not str(c).lstrip("-").isdigit()]
        if bad:
            msg = (
                f"task.options.ordinal: true needs integer classes (grades), but "
                f"{where} has class names {list(class_names)} ({bad[0]!r} is not an "
                "integer); relabel the grades as integers or set ordinal: false."
            )
            raise ConfigError(msg)

    report_metrics = ("auc", "accuracy", "balanced_accuracy", "f1", "kappa")

    def fold_extras(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> dict[str, Any]:
        """``confusion_matrix`` (rows: label, columns: argmax prediction)."""
        labels = [int(b.label) for b in bags]
        return {
            "confusion_matrix": confusion(labels, outputs.argmax(1), outputs.shape[1])
        }

    def report_sections(
        self,
        run_dir: Any,
        results: Sequence[dict[str, Any]],
        summary: dict[str, Any] | None = None,
    ) -> list[str]:
        """Per-class AUC / recall table and the confusion matrix (summed over folds)."""
        from tiahnm.tasks.report import multiclass_sections

        return multiclass_sections(self, results, summary or {})

    def describe(self) -> dict[str, Any]:
        """Name, ordinal flag and the kappa weighting."""
        return {
            "name": self.name,
            "ordinal": self.ordinal,
            "kappa_weights": "quadratic" if self.ordinal else "none",
        }


def multiclass_metrics(
    labels: Sequence[int], probs: np.ndarray, *, ordinal: bool = False
) -> dict[str, float]:
    """Multi-class metrics from ``[n, C]`` probabilities (scikit-learn).

    ``auc`` is the macro one-vs-rest AUC (NaN unless every class is present),
    ``auc_class<k>`` / ``recall_class<k>`` the per-class values, ``accuracy`` the
    plain fraction correct, ``balanced_accuracy`` the mean per-class recall, ``f1``
    the macro F1, ``kappa`` Cohen's kappa (quadratic weights when ``ordinal``).
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        cohen_kappa_score,
        f1_score,
        recall_score,
        roc_auc_score,
    )

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = p.shape[1]
    pred = p.argmax(1)
    classes = list(range(n_classes))
    out: dict[str, float] = {}
    present = set(np.unique(y).tolist())
    out["auc"] = (
        float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=classes))
        if present == set(classes)
        else math.nan
    )
    out["accuracy"] = float(accuracy_score(y, pred))
    out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
    out["f1"] = float(
        f1_score(y, pred, average="macro", labels=classes, zero_division=0)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = cohen_kappa_score(
            y, pred, labels=classes, weights="quadratic" if ordinal else None
        )
    out["kappa"] = float(kappa)
    recalls = recall_score(y, pred, labels=classes, average=None, zero_division=0)
    for k in classes:
        both = (y == k).any() and (y != k).any()
        out[f"auc_class{k}"] = (
            float(roc_auc_score(y == k, p[:, k])) if both else math.nan
        )
        out[f"recall_class{k}"] = float(recalls[k]) if (y == k).any() else math.nan
    return out


def _targets(rows: Sequence[dict[str, Any]]) -> list[Target]:
    return [
        Target(
            str(r["slide_id"]),
            int(r["label"]),
            float(r["time"]) if r.get("time") is not None else None,
            int(r["event"]) if r.get("event") is not None else None,
            str(r["patient_id"]) if r.get("patient_id") else None,
        )
        for r in rows
    ]


def confusion(
    labels: Sequence[int], preds: Sequence[int], n_classes: int
) -> list[list[int]]:
    """Confusion matrix, rows = true class, columns = predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, preds, labels=list(range(n_classes))).tolist()


__all__ = [
    "BinaryTask",
    "MulticlassTask",
    "Target",
    "confusion",
    "group_outputs",
    "multiclass_metrics",
]
