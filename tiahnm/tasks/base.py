"""The :class:`Task` contract: what a label is and how a head is trained and scored.

A task owns the label semantics, the loss, how head outputs become predictions and
scores, the metrics, the model-selection monitor, the threshold rule, how
cross-validation is stratified and its report sections. Heads stay task-agnostic: they
give ``C`` bag logits (and say which logit streams their loss trains through
:meth:`~tiahnm.heads.MILHead.loss_terms`); the task turns them into a loss.

Tasks register through the ``tiahnm_register_tasks`` hook
(``factory(**options) -> Task``); the built-ins ``binary``, ``multiclass`` and
``survival`` use that very hook (:mod:`tiahnm.tasks.plugin`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tiahnm.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - torch is imported when a loss is computed
    import torch

# Bags, heads and head outputs are typed loosely here: the task layer sits below
# tiahnm.data / tiahnm.heads (duck-typed: ``Bag`` fields, ``MILHead.loss_terms``).
Bag = Any
MILHead = Any
MILOutput = Any

ALL_TASKS = ("binary", "multiclass", "survival", "regression")


class Task:
    """Base class of tasks (classification semantics by default).

    Class attributes:
        name (str): The registered name.
        classifies (bool): Bag labels are classes (binary, multiclass); a data set
            of one class is then refused before training.
        couples_bags (bool): True when the loss is defined over a set of bags (Cox
            partial likelihood): the loop then forwards the bags of an optimiser
            step as one batch and adds :meth:`batch_loss`.
        monitors (tuple[str, ...]): ``train.monitor`` values this task accepts.
        primary_metric (str): The headline metric of reports.
    """

    name = "task"
    #: Labels are classes (at least two must be present to train).
    classifies = True
    couples_bags = False
    monitors: tuple[str, ...] = ("val_loss", "val_auc", "val_acc")
    primary_metric = "auc"

    # ----- labels and shapes -------------------------------------------------
    def n_outputs(self, n_classes: int) -> int:
        """Bag logits ``C`` the head must give for ``n_classes`` label values."""
        return n_classes

    def check_bags(self, bags: Sequence[Bag]) -> None:
        """Raise :class:`~tiahnm.errors.DataError` naming the bag at fault."""

    def check_class_names(self, class_names: Sequence[str], where: str) -> None:
        """Raise :class:`ConfigError` when the data's class names do not fit the task."""

    def check_head(self, head: MILHead, head_name: str) -> None:
        """Raise :class:`ConfigError` when ``head`` cannot serve this task."""

    def check_monitor(self, monitor: str) -> None:
        """Raise :class:`ConfigError` when ``train.monitor`` makes no sense here."""
        if monitor not in self.monitors:
            msg = (
                f"train.monitor: {monitor!r} is not available for task {self.name!r}; "
                f"use one of {', '.join(self.monitors)}."
            )
            raise ConfigError(msg)

    def stratify_labels(self, bags: Sequence[Bag]) -> np.ndarray:
        """The labels cross-validation stratifies on (class, or event for survival)."""
        return np.asarray([b.label for b in bags], dtype=np.int64)

    def check_folds(self, bags: Sequence[Bag], folds: Sequence[Any]) -> None:
        """Raise :class:`~tiahnm.errors.DataError` naming a fold this task cannot train.

        Runs when the splits are made, before any training (``folds`` are
        :class:`~tiahnm.training.splits.Fold`: ``name``, ``train``, ``val``, ``test``).
        """

    def fit(self, train_bags: Sequence[Bag]) -> None:
        """Learn per-fold state from the training bags only (survival bins)."""

    # ----- loss ----------------------------------------------------------------
    def criterion(self, logits: torch.Tensor, bags: Sequence[Bag]) -> torch.Tensor:
        """Mean loss of ``[B, C]`` logits of ``bags`` (cross-entropy here)."""
        import torch

        y = torch.tensor([b.label for b in bags], device=logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), y)

    def bag_loss(self, head: MILHead, out: MILOutput, bag: Bag) -> torch.Tensor:
        """One bag's loss: the criterion over the head's loss terms plus its aux losses.

        A task that :attr:`couples_bags` returns only the auxiliary losses here (the
        coupled part comes from :meth:`batch_loss`).
        """
        loss: torch.Tensor | None = None
        if not self.couples_bags:
            for weight, logits in head.loss_terms(out):
                term = self.criterion(logits, [bag])
                term = term if weight == 1.0 else weight * term
                loss = term if loss is None else loss + term
        if loss is None:
            loss = out.bag_logits.float().sum() * 0.0
        for value in out.aux_losses.values():
            loss = loss + value
        return loss

    def batch_loss(
        self, head: MILHead, outs: Sequence[MILOutput], bags: Sequence[Bag]
    ) -> torch.Tensor | None:
        """The loss coupling the bags of a batch (None for per-bag tasks)."""
        import torch

        if not self.couples_bags:
            return None
        loss: torch.Tensor | None = None
        for j, (weight, _) in enumerate(head.loss_terms(outs[0])):
            logits = torch.cat([head.loss_terms(o)[j][1] for o in outs])
            term = weight * self.criterion(logits, bags)
            loss = term if loss is None else loss + term
        return loss

    def eval_loss(self, outputs: np.ndarray, bags: Sequence[Bag]) -> float | None:
        """Validation loss from :meth:`outputs` of all bags (coupled tasks only)."""
        return None

    # ----- predictions -----------------------------------------------------------
    def outputs(self, out: MILOutput) -> torch.Tensor:
        """``[C]`` per-bag output kept by prediction (class probabilities here)."""
        return out.bag_probabilities()

    def score(self, outputs: np.ndarray) -> np.ndarray:
        """One number per bag: positive-class probability, max probability or risk."""
        return outputs[:, 1] if outputs.shape[1] == 2 else outputs.max(1)

    #: Store ``[N, C]`` per-class instance scores with the heatmap scores (C > 2).
    per_class_instance_scores = False

    #: What :meth:`score` is, as a column name (``probability`` or ``risk``).
    score_name = "probability"

    def predicted_labels(self, outputs: np.ndarray, threshold: float) -> np.ndarray:
        """Per-bag decision: class at ``threshold`` (binary), argmax, or high risk."""
        if outputs.shape[1] == 2:
            return (outputs[:, 1] >= threshold).astype(np.int64)
        return outputs.argmax(1).astype(np.int64)

    def output_columns(self, outputs: np.ndarray, threshold: float) -> dict[str, Any]:
        """Columns of an unlabelled bag's ``predictions.csv`` row from its ``[W]`` outputs.

        ``probability`` (positive or top class) and ``prediction``; with more than 2
        classes also ``p_<k>``.
        """
        row = outputs.reshape(1, -1)
        cols: dict[str, Any] = {
            "probability": float(self.score(row)[0]),
            "prediction": int(self.predicted_labels(row, threshold)[0]),
        }
        if row.shape[1] > 2:
            cols.update({f"p_{k}": float(v) for k, v in enumerate(row[0])})
        return cols

    def target(self, bag: Bag) -> int:
        """The integer stored as a bag's label with its scores (class, or event)."""
        return int(bag.label)

    def spec(self) -> dict[str, Any]:
        """``{"name", "options"}`` rebuilding this task (stored in checkpoints)."""
        return {"name": self.name, "options": {}}

    def threshold(
        self, val_bags: Sequence[Bag], val_outputs: np.ndarray, rule: str
    ) -> float:
        """Decision threshold chosen on validation bags only."""
        return 0.5

    def metrics(
        self, bags: Sequence[Bag], outputs: np.ndarray, threshold: float
    ) -> dict[str, float]:
        """Test metrics of one fold."""
        raise NotImplementedError

    def val_row(
        self, val_bags: Sequence[Bag], val_outputs: np.ndarray
    ) -> dict[str, float]:
        """Validation numbers added to each epoch's history row."""
        return {}

    def monitor_score(
        self,
        monitor: str,
        val_loss: float,
        val_outputs: np.ndarray,
        val_bags: Sequence[Bag],
    ) -> tuple[float, float]:
        """Model-selection score, higher is better: (primary, tie-break by loss)."""
        if monitor == "val_loss":
            return (-val_loss, 0.0)
        value = self.val_row(val_bags, val_outputs).get(
            _MONITOR_KEYS[monitor], math.nan
        )
        if math.isnan(value):
            value = -math.inf
        return (value, -val_loss)

    def prediction_rows(
        self, bags: Sequence[Bag], outputs: np.ndarray, threshold: float
    ) -> list[dict[str, Any]]:
        """One ``predictions.csv`` row per bag (``slide_id`` first)."""
        raise NotImplementedError

    def from_rows(self, rows: Sequence[dict[str, Any]]) -> tuple[list[Any], np.ndarray]:
        """Targets and outputs back from :meth:`prediction_rows` (for pooled CIs)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``summary.json`` records about the task."""
        return {"name": self.name}

    def report_sections(
        self,
        run_dir: Any,
        results: Sequence[dict[str, Any]],
        summary: dict[str, Any] | None = None,
    ) -> list[str]:
        """Extra markdown lines (and PNGs written in ``run_dir``) for ``report.md``."""
        return []

    #: Slide metrics of the report's main table, in order.
    report_metrics: tuple[str, ...] = (
        "auc",
        "accuracy",
        "f1",
        "balanced_accuracy",
        "precision",
        "recall",
        "fpr",
    )

    def fold_extras(
        self, bags: Sequence[Bag], outputs: np.ndarray, threshold: float
    ) -> dict[str, Any]:
        """Extra entries of a fold's ``result.json`` (the multi-class confusion matrix)."""
        return {}

    #: Metrics bootstrapped over pooled test predictions (None: the binary path of
    #: :mod:`tiahnm.evaluation.metrics`).
    ci_metrics: tuple[str, ...] | None = None


_MONITOR_KEYS = {
    "val_auc": "val_auc",
    "val_acc": "val_acc",
    "val_c_index": "val_c_index",
}


def task_from_spec(spec: Any, n_classes: int = 2) -> Task:
    """The task a ``summary.json`` / checkpoint ``task_spec`` names (binary if none)."""
    from tiahnm.tasks import build_task, default_task

    if not isinstance(spec, dict) or "name" not in spec:
        return default_task(n_classes)
    return build_task(str(spec["name"]), spec.get("options") or {}, n_classes)


def supported_tasks(miner: Any) -> tuple[str, ...]:
    """Tasks a miner declares (:attr:`tiahnm.miners.Miner.supported_tasks`)."""
    return tuple(miner.supported_tasks)


def check_miner(task: Task, miner: Any, miner_name: str) -> None:
    """ConfigError naming both when ``miner`` does not support ``task``."""
    tasks = supported_tasks(miner)
    if task.name not in tasks:
        msg = (
            f"miner {miner_name!r} does not support task {task.name!r} "
            f"(it supports: {', '.join(tasks)}); change miner.name or task.name."
        )
        raise ConfigError(msg)


__all__ = ["ALL_TASKS", "Task", "check_miner", "task_from_spec"]
