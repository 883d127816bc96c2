"""Multiple-instance ranking loss (Huang et al., MICCAI 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tiahnm.errors import ConfigError
from tiahnm.losses.base import BatchLoss

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.heads.base import MILHead, MILOutput


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
    top_pos = pos_scores.float().topk(min(k, pos_scores.numel())).values.mean()
    top_neg = neg_scores.float().topk(min(k, neg_scores.numel())).values.mean()
    return torch.clamp(margin - top_pos + top_neg, min=0.0)


class MIRankLoss(BatchLoss):
    """MI-Rank over every (positive, negative) bag pair in a step's batch.

    Args:
        k (int): Top-K instances per bag (10 in HNM-WSI).
        margin (float): Ranking margin (1.0).
        on (str): ``logit`` (HNM's code: raw instance logits of the positive class) or
            ``prob`` (instance probabilities).
        score (str | None): Instance score kind to rank (default: the head's
            ``instance_logit`` / ``instance_prob``).
    """

    def __init__(
        self,
        *,
        k: int = 10,
        margin: float = 1.0,
        on: str = "logit",
        score: str | None = None,
    ) -> None:
        if on not in ("logit", "prob"):
            msg = f"losses[mirank].options.on must be 'logit' or 'prob', got {on!r}."
            raise ConfigError(msg)
        if k < 1:
            msg = f"losses[mirank].options.k must be >= 1, got {k}."
            raise ConfigError(msg)
        self.k = k
        self.margin = margin
        self.score = score or ("instance_logit" if on == "logit" else "instance_prob")

    def __call__(
        self, head: MILHead, outputs: Sequence[MILOutput], labels: Sequence[int]
    ) -> torch.Tensor | None:
        """Mean ranking loss over all positive/negative pairs of the batch."""
        pos = [o for o, y in zip(outputs, labels, strict=True) if y == 1]
        neg = [o for o, y in zip(outputs, labels, strict=True) if y == 0]
        if not pos or not neg:
            return None
        losses = [
            mi_rank_loss(
                head.instance_scores(p, self.score),
                head.instance_scores(n, self.score),
                k=self.k,
                margin=self.margin,
            )
            for p in pos
            for n in neg
        ]
        return torch.stack(losses).mean()
