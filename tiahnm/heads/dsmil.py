"""Dual-stream MIL (Li, Li and Eliceiri, CVPR 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tiahnm.heads.base import MILHead, MILOutput
from tiahnm.heads.options import KEY, HeadOptions
from tiahnm.utils.options import option, parse


@dataclass(frozen=True)
class DSMILOptions(HeadOptions):
    """Options of :class:`DSMIL` (``head.options``)."""

    query_dim: int = option(
        128, low=1, help="Width of the query/key space (128 in the paper)."
    )
    bag_weight: float = option(
        0.5, low=0, high=1, help="Weight of the bag-stream loss (0.5 in the paper)."
    )
    passing_v: bool = option(
        default=True, help="Pass values through a ReLU+Linear (true) or use h."
    )
    combine: str = option(
        "mean",
        choices=("mean", "bag"),
        help="Prediction: mean of the bag and max-instance logits, or bag only.",
    )


class DSMIL(MILHead):
    """DSMIL: a max-pooling instance stream and a critical-instance attention stream.

    The instance classifier gives ``c = W h`` ``[N, C]``; for each class the critical
    instance ``m_c = argmax_i c_ic`` is the query, ``A_ic = softmax_i(<q_i, q_m_c> /
    sqrt(d_q))``, and the bag logit of class c is a linear map of ``B_c = sum_i A_ic
    v_i`` (the paper's Conv1d over the C rows). The loss is ``w_bag * CE(bag) + (1 -
    w_bag) * CE(max-instance)``. The prediction (``bag_logits``) combines the two
    streams: their mean logits (``combine="mean"``, as DSMIL's evaluation and MHIM-v2
    do) or the bag stream alone (``combine="bag"``).

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        **options: The options of :class:`DSMILOptions`.
    """

    supported_scores = ("attention", "instance_prob", "class_aware", "instance_logit")
    default_eval_score = "instance_prob"

    def mining_score(self) -> str:
        """The instance classifier's logit (DSMIL's critical-instance score)."""
        return "instance_logit"

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        opts = parse(DSMILOptions, options, key=KEY)
        super().__init__(
            in_dim,
            n_classes,
            embed_dim=opts.embed_dim,
            dropout=opts.dropout,
            act=opts.act,
        )
        embed_dim, query_dim = opts.embed_dim, opts.query_dim
        self.instance_classifier = nn.Linear(embed_dim, n_classes)
        self.q = nn.Sequential(
            nn.Linear(embed_dim, query_dim),
            nn.ReLU(),
            nn.Linear(query_dim, query_dim),
            nn.Tanh(),
        )
        self.v = (
            nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU())
            if opts.passing_v
            else nn.Identity()
        )
        # Conv1d(C, C, kernel=E) of the paper: one logit per class from all C rows.
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=embed_dim)
        self.bag_weight = opts.bag_weight
        self.combine = opts.combine
        self._scale = 1.0 / math.sqrt(query_dim)

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Dual-stream pooling."""
        c = self.instance_classifier(h)  # [N, C]
        q = self.q(h)  # [N, Q]
        v = self.v(h)  # [N, E]
        critical = c.argmax(dim=0)  # [C]
        q_max = q.index_select(0, critical)  # [C, Q]
        attn = torch.softmax((q @ q_max.T) * self._scale, dim=0)  # [N, C]
        bag_repr = attn.T @ v  # [C, E]
        stream_logits = self.bag_classifier(bag_repr.unsqueeze(0)).view(1, -1)  # [1, C]
        max_logits = self._max_instance_logits(c)  # [1, C]
        bag_logits = (
            stream_logits
            if self.combine == "bag"
            else 0.5 * (stream_logits + max_logits)
        )
        return MILOutput(
            bag_logits=bag_logits,
            bag_embedding=bag_repr.unsqueeze(0),
            instance_embeddings=h,
            attention=attn.T,
            instance_logits=c,
            extras={
                "bag_stream_logits": stream_logits,
                "max_instance_logits": max_logits,
            },
        )

    def _max_instance_logits(self, c: torch.Tensor) -> torch.Tensor:
        """Logits of the max-pooling stream ``[1, C]``.

        Binary: the logits of the instance with the largest positive margin
        ``c_i1 - c_i0`` (the standard MIL assumption: a bag is as positive as its most
        positive instance). More classes: the per-class maximum over instances.
        """
        if self.n_classes == 2:
            top = (c[:, 1] - c[:, 0]).argmax()
            return c[top].unsqueeze(0)
        return c.max(dim=0).values.unsqueeze(0)

    def loss_terms(self, out: MILOutput) -> list[tuple[float, torch.Tensor]]:
        """``bag_weight`` x bag stream, ``1 - bag_weight`` x max-instance stream."""
        return [
            (self.bag_weight, out.extras["bag_stream_logits"]),
            (1.0 - self.bag_weight, out.extras["max_instance_logits"]),
        ]
