"""Multiple-instance ranking loss (Huang et al., MICCAI 2024).

``L = max(0, margin - mean(topK s_pos) + mean(topK s_neg))`` over the instance scores of
a positive and a negative bag. HNM-WSI's code ranks raw instance logits (K = 10, margin
1, weight 0.1 beside DSMIL's 0.5 bag + 0.5 max-instance losses) on (positive, negative)
bag pairs; pair the bags with the ``hnm`` miner (``pair_bags: true``) or any miner whose
batches hold both classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tiahnm.errors import ConfigError
from tiahnm.losses.base import BatchLoss
from tiahnm.utils.options import Options, option, parse

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.heads.base import MILHead, MILOutput

PAIRINGS = ("all", "index")


def mi_rank_loss(
    pos_scores: torch.Tensor,
    neg_scores: torch.Tensor,
    *,
    k: int = 10,
    margin: float = 1.0,
) -> torch.Tensor:
    """``max(0, margin - mean(topK pos) + mean(topK neg))``; K is clipped per bag.

    Args:
        pos_scores (torch.Tensor): ``[N_p]`` instance scores of a positive bag.
        neg_scores (torch.Tensor): ``[N_n]`` instance scores of a negative bag.
        k (int): Instances averaged from the top of each bag.
        margin (float): Ranking margin.
    """
    if k < 1:
        msg = f"k must be >= 1, got {k}."
        raise ValueError(msg)
    if pos_scores.numel() == 0 or neg_scores.numel() == 0:
        msg = "mi_rank_loss needs at least one instance in each bag."
        raise ValueError(msg)
    top_pos = pos_scores.float().topk(min(k, pos_scores.numel())).values.mean()
    top_neg = neg_scores.float().topk(min(k, neg_scores.numel())).values.mean()
    return torch.clamp(margin - top_pos + top_neg, min=0.0)


@dataclass(frozen=True)
class MIRankOptions(Options):
    """Options of :class:`MIRankLoss` (``losses[i].options``)."""

    k: int = option(10, low=1, help="Top-K instances per bag (10 in HNM-WSI).")
    margin: float = option(1.0, help="Ranking margin.")
    on: str = option(
        "logit",
        choices=("logit", "prob"),
        help="logit (HNM's code: raw instance logits of the positive class) or prob "
        "(instance probabilities).",
    )
    score: str | None = option(
        None,
        help="Instance score kind to rank (default: the head's instance_logit / "
        "instance_prob); any kind the head lists in supported_scores (e.g. "
        "class_aware for AB-MIL, which has no instance classifier).",
    )
    pairing: str = option(
        "all",
        choices=PAIRINGS,
        help="Which (positive, negative) pairs of a step's batch are ranked: all "
        "(every pair, mean) or index (the i-th positive with the i-th negative in "
        "batch order, as HNM's index-wise bag pairing; surplus bags of one class are "
        "not ranked).",
    )


class MIRankLoss(BatchLoss):
    """MI-Rank over every (positive, negative) bag pair in a step's batch.

    Takes the options of :class:`MIRankOptions`.
    """

    def __init__(self, **options: Any) -> None:
        opts = parse(MIRankOptions, options, key="losses[mirank].options")
        self.pairing = opts.pairing
        self.k = opts.k
        self.margin = opts.margin
        self.score = opts.score or (
            "instance_logit" if opts.on == "logit" else "instance_prob"
        )

    def __call__(
        self, head: MILHead, outputs: Sequence[MILOutput], labels: Sequence[int]
    ) -> torch.Tensor | None:
        """Mean ranking loss over the batch's (positive, negative) pairs, or ``None``.

        ``None`` when the batch lacks a class or every pair has an empty bag.

        Raises:
            ConfigError: The head does not give the configured score kind.
        """
        supported = tuple(getattr(head, "supported_scores", ()))
        if self.score not in supported:
            msg = (
                f"losses[mirank]: head {type(head).__name__} gives no {self.score!r} "
                f"instance scores; set losses[mirank].options.score to one of "
                f"{', '.join(supported) or '(none)'}."
            )
            raise ConfigError(msg)
        pos = [o for o, y in zip(outputs, labels, strict=True) if y == 1]
        neg = [o for o, y in zip(outputs, labels, strict=True) if y == 0]
        if not pos or not neg:
            return None
        pos_scores = [head.instance_scores(o, self.score) for o in pos]
        neg_scores = [head.instance_scores(o, self.score) for o in neg]
        if self.pairing == "index":
            pairs = list(zip(pos_scores, neg_scores, strict=False))
        else:
            pairs = [(p, n) for p in pos_scores for n in neg_scores]
        losses = [
            mi_rank_loss(p, n, k=self.k, margin=self.margin)
            for p, n in pairs
            if p.numel() and n.numel()
        ]
        if not losses:
            return None
        return torch.stack(losses).mean()
