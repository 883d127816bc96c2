"""Mean- and max-pooling baselines over instance logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tiahnm.heads.base import MILHead, MILOutput
from tiahnm.heads.options import KEY, HeadOptions
from tiahnm.utils.options import parse


class PoolingMIL(MILHead):
    """Instance classifier on projected instances, pooled by mean or max.

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        pool (str): ``mean`` or ``max`` over the instance logits.
        **options: The options of :class:`~tiahnm.heads.options.HeadOptions`.
    """

    supported_scores = ("instance_prob", "class_aware", "instance_logit")
    default_eval_score = "instance_prob"

    def __init__(
        self, in_dim: int, n_classes: int = 2, *, pool: str = "mean", **options: Any
    ) -> None:
        opts = parse(HeadOptions, options, key=KEY)
        super().__init__(
            in_dim,
            n_classes,
            embed_dim=opts.embed_dim,
            dropout=opts.dropout,
            act=opts.act,
        )
        if pool not in ("mean", "max"):
            from tiahnm.errors import ConfigError

            msg = f"head.options.pool must be 'mean' or 'max', got {pool!r}."
            raise ConfigError(msg)
        self.pool = pool
        self.classifier = nn.Linear(opts.embed_dim, n_classes)

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Pool instance logits (and embeddings, for the bag embedding)."""
        c = self.classifier(h)
        if self.pool == "mean":
            bag_logits = c.mean(0, keepdim=True)
            z = h.mean(0, keepdim=True)
        else:
            bag_logits = c.max(0, keepdim=True).values
            z = h.max(0, keepdim=True).values
        return MILOutput(
            bag_logits=bag_logits,
            bag_embedding=z,
            instance_embeddings=h,
            instance_logits=c,
        )

    def supports_padding(self) -> bool:
        """Padded batches are always supported."""
        return True

    def forward_padded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bag logits ``[B, C]`` of a padded batch.

        Args:
            x (torch.Tensor): ``[B, N_max, D]`` features, zero-padded.
            mask (torch.Tensor): ``[B, N_max]`` bool, True for real instances.
        """
        c = self.classifier(self.embed(x))
        m = mask[:, :, None]
        if self.pool == "mean":
            return (c * m).sum(1) / m.sum(1).to(c.dtype)
        return c.masked_fill(~m, float("-inf")).max(1).values


class MeanPoolingMIL(PoolingMIL):
    """Mean pooling of instance logits (options: :class:`HeadOptions`)."""

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        super().__init__(in_dim, n_classes, pool="mean", **options)


class MaxPoolingMIL(PoolingMIL):
    """Max pooling of instance logits (options: :class:`HeadOptions`)."""

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        super().__init__(in_dim, n_classes, pool="max", **options)
