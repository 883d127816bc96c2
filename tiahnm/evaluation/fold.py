"""The evaluation steps of one cross-validation fold (called by ``tiahnm.crossval``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tiahnm.evaluation.metrics import instance_metrics, instance_threshold
from tiahnm.evaluation.reference import validation_reference
from tiahnm.evaluation.scores import (
    SCORES_FILE,
    scores_from_bags,
    write_instance_scores,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tiahnm.data.bag import Bag
    from tiahnm.heads.base import MILHead

logger = logging.getLogger(__name__)


def predict_with_scores(
    head: MILHead,
    bags: Sequence[Bag],
    device: torch.device,
    *,
    amp: torch.dtype | None = None,
    want_scores: bool = True,
    task: Any = None,
) -> tuple[np.ndarray, float, list[np.ndarray] | None]:
    """:func:`~tiahnm.training.loop.predict` with instance scores when the head has them.

    A head whose :meth:`instance_scores` raises ``ValueError`` (a plugin head without
    its ``default_eval_score``) is predicted without scores, with a warning.
    ``task`` (a :class:`tiahnm.tasks.Task`) gives the output rows and the loss.

    Returns:
        tuple: ``(probs [n, C], mean loss, instance scores per bag or None)``.
    """
    from tiahnm.training.loop import predict

    if want_scores and bags:
        try:
            return predict(head, bags, device, amp=amp, instance_scores=True, task=task)
        except (ValueError, NotImplementedError) as exc:
            logger.warning(
                "%s gives no instance scores (%s); no instance metrics or heatmaps.",
                type(head).__name__,
                exc,
            )
    return predict(head, bags, device, amp=amp, task=task)


@dataclass
class InstanceEvaluation:
    """What :func:`evaluate_fold_instances` returns.

    Attributes:
        threshold (float): Instance threshold (chosen on validation bags only).
        metrics (dict[str, float]): ``instance_auc``, ``instance_ap``,
            ``instance_f1`` when every test bag has instance labels.
        scores_file (Path | None): The ``instance_scores.h5`` written.
    """

    threshold: float = 0.5
    metrics: dict[str, float] = field(default_factory=dict)
    scores_file: Path | None = None


def evaluate_fold_instances(
    *,
    val: Sequence[Bag],
    val_scores: Sequence[np.ndarray] | None,
    test: Sequence[Bag],
    test_scores: Sequence[np.ndarray] | None,
    test_probs: np.ndarray,
    threshold: float,
    rule: str,
    fold_dir: str | Path,
    head: MILHead,
    task: Any = None,
) -> InstanceEvaluation:
    """Instance threshold (validation), metrics and ``instance_scores.h5`` (test).

    Args:
        val (Sequence[Bag]): Validation bags (the only labels the threshold sees).
        val_scores (Sequence[np.ndarray] | None): Their instance scores.
        test (Sequence[Bag]): Test bags.
        test_scores (Sequence[np.ndarray] | None): Their instance scores.
        test_probs (np.ndarray): ``[n, C]`` test slide probabilities.
        threshold (float): The slide threshold (stored with the scores).
        rule (str): ``evaluation.instance_threshold`` (``"0.5"`` or ``"youden"``).
        fold_dir (str | Path): Where ``instance_scores.h5`` goes.
        head (MILHead): The head (its ``default_eval_score`` names the scores).
        task (Task | None): Slide score and decision of the stored entries; a task
            with ``per_class_instance_scores`` also stores ``[N, C]`` class scores.

    Returns:
        InstanceEvaluation: Threshold, metrics and the scores file.
    """
    out = InstanceEvaluation(threshold=instance_threshold(val, val_scores, rule))
    if test_scores is None:
        return out
    out.metrics = instance_metrics(test, test_scores, out.threshold)
    per_class = None
    if task is not None and task.per_class_instance_scores:
        per_class = class_instance_scores(head, test)
    slides = scores_from_bags(
        test, test_scores, test_probs, threshold, task=task, class_scores=per_class
    )
    out.scores_file = write_instance_scores(
        Path(fold_dir) / SCORES_FILE,
        slides,
        {
            "slide_score": "probability" if task is None else task.score_name,
            "score_kind": head.default_eval_score,
            "head": type(head).__name__,
            "threshold": threshold,
            "instance_threshold": out.threshold,
            # percentiles of validation patch scores: the heatmaps' colour scale
            "val_reference": json.dumps(validation_reference(val, val_scores)),
        },
    )
    return out


def class_instance_scores(
    head: MILHead, bags: Sequence[Bag]
) -> list[np.ndarray] | None:
    """``[N, C]`` instance probabilities of every class per bag (None if the head has none).

    One extra forward pass over ``bags`` (the test bags of a fold).
    """
    import torch

    if "instance_prob" not in head.supported_scores or not bags:
        return None
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    out = []
    try:
        with torch.inference_mode():
            for bag in bags:
                res = head(bag.features.to(device))
                cols = [
                    head.instance_scores(res, "instance_prob", target=k)
                    for k in range(head.n_classes)
                ]
                out.append(torch.stack(cols, dim=1).float().cpu().numpy())
    except (ValueError, NotImplementedError):
        out = None  # type: ignore[assignment]
    finally:
        head.train(was_training)
    return out


__all__ = [
    "InstanceEvaluation",
    "class_instance_scores",
    "evaluate_fold_instances",
    "predict_with_scores",
]
