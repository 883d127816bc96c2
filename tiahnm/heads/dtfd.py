"""DTFD-MIL (Zhang et al., CVPR 2022): double-tier feature distillation, one head.

The bag is split into G pseudo-bags. Tier 1 is a gated-attention MIL model applied
to every pseudo-bag (each pseudo-bag inherits the bag label); one feature vector is
distilled from every pseudo-bag; tier 2 is a gated-attention MIL model on the
distilled vectors and gives the bag prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tiahnm.heads.abmil import AttentionPool
from tiahnm.heads.base import MILHead, MILOutput
from tiahnm.heads.options import KEY, HeadOptions
from tiahnm.utils.options import option, parse

DISTILL_MODES = ("afs", "maxs", "maxmins")

#: Seed of the fixed instance order used to split bags into pseudo-bags in eval mode.
EVAL_SPLIT_SEED = 0


@dataclass(frozen=True)
class DTFDOptions(HeadOptions):
    """Options of :class:`DTFD` (``head.options``)."""

    attn_dim: int = option(
        128, low=1, help="Hidden width of both gated attention nets."
    )
    n_groups: int = option(4, low=1, help="Number of pseudo-bags G.")
    distill: str = option(
        "afs", choices=DISTILL_MODES, help="Distilled vectors: afs, maxs or maxmins."
    )
    tier1_weight: float = option(1.0, low=0, help="Weight of the tier-1 loss.")


class DTFD(MILHead):
    """DTFD-MIL as a single head.

    Pseudo-bags: ``G = min(n_groups, N)``; the instances are ordered, then cut into
    G contiguous chunks of nearly equal size (``torch.tensor_split``). In train
    mode the order is ``torch.randperm(N)`` drawn from the global (CPU) torch RNG,
    as in the paper's random split. In eval mode the order is a fixed permutation
    drawn from a private generator seeded with :data:`EVAL_SPLIT_SEED`, so that the
    eval forward is deterministic, depends only on ``N`` and does not touch the
    global RNG, while the pseudo-bags stay random-like subsets of the slide as in
    training (chunks in the stored instance order would be spatially clustered).

    Tier 1: raw gated-attention scores ``s = attn1(h)``; inside pseudo-bag g,
    ``a = softmax(s_g)``, ``z_g = sum a_i h_i`` and ``classifier1(z_g)`` gives the
    tier-1 logits ``extras["tier1_logits"]`` ``[G, C]``. When a label is passed (in
    either mode), ``aux_losses["tier1"] = tier1_weight * mean_g CE(tier1_g, y)``.

    Distillation (``distill``): ``afs`` uses ``z_g``; ``maxs`` the instance of
    pseudo-bag g with the highest CAM score; ``maxmins`` the highest and the lowest
    (2G vectors). The CAM score of instance i is ``1 - softmax(classifier1(a_i
    h_i))_0`` (for C = 2 the class-1 probability, the official DTFD choice); the
    selected rows of ``h`` (not attention-weighted) are distilled.

    Tier 2: gated attention MIL on the distilled vectors gives ``bag_logits`` and
    ``bag_embedding``.

    ``attention`` ``[1, N]``: the tier-1 attention scattered back to instance
    order, softmax within each pseudo-bag divided by G (so it sums to 1).

    ``instance_logits`` ``[N, C]``: the tier-1 CAM computed with a single
    pseudo-bag (the whole slide), ``classifier1(a_i h_i)`` with ``a =
    softmax(s)`` over all N instances, which does not depend on the split (the
    design's recommendation, deterministic in both modes).

    The projection is the base's ``Linear + act + dropout`` (the official
    DimReduction has no bias).

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        **options: The options of :class:`DTFDOptions`.
    """

    supported_scores = ("attention", "instance_prob", "class_aware", "instance_logit")
    default_eval_score = "instance_prob"
    needs_label_in_forward = True

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        opts = parse(DTFDOptions, options, key=KEY)
        super().__init__(
            in_dim,
            n_classes,
            embed_dim=opts.embed_dim,
            dropout=opts.dropout,
            act=opts.act,
        )
        self.n_groups = opts.n_groups
        self.distill = opts.distill
        self.tier1_weight = opts.tier1_weight
        embed_dim, attn_dim = opts.embed_dim, opts.attn_dim
        self.attention1 = AttentionPool(embed_dim, attn_dim, gated=True)
        self.classifier1 = nn.Linear(embed_dim, n_classes)
        self.attention2 = AttentionPool(embed_dim, attn_dim, gated=True)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def split(self, n: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Index tensors of the pseudo-bags of a bag of ``n`` instances."""
        groups = min(self.n_groups, n)
        if self.training:
            order = torch.randperm(n)
        else:
            gen = torch.Generator().manual_seed(EVAL_SPLIT_SEED)
            order = torch.randperm(n, generator=gen)
        return [chunk.to(device) for chunk in torch.tensor_split(order, groups)]

    def _cam_logits(self, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.classifier1(a.unsqueeze(-1) * h)

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Tier 1 on pseudo-bags, distillation, tier 2 (see the class doc)."""
        n = h.shape[0]
        scores = self.attention1(h)[0]  # [N] raw tier-1 scores
        groups = self.split(n, h.device)
        g = len(groups)
        pooled, distilled, group_attention = [], [], []
        for idx in groups:
            h_g = h.index_select(0, idx)
            a_g = torch.softmax(scores.index_select(0, idx), dim=0)
            z_g = (a_g.unsqueeze(0) @ h_g)[0]
            pooled.append(z_g)
            group_attention.append(a_g)
            if self.distill == "afs":
                distilled.append(z_g.unsqueeze(0))
                continue
            with torch.no_grad():
                probs = torch.softmax(self._cam_logits(a_g, h_g).float(), dim=-1)
                cam = 1.0 - probs[:, 0]
            picks = [cam.argmax()]
            if self.distill == "maxmins":
                picks.append(cam.argmin())
            distilled.append(h_g.index_select(0, torch.stack(picks)))
        z1 = torch.stack(pooled)  # [G, E]
        tier1_logits = self.classifier1(z1)  # [G, C]
        feats = torch.cat(distilled)  # [G or 2G, E]
        a2 = torch.softmax(self.attention2(feats), dim=-1)  # [1, G']
        z2 = a2 @ feats
        attention = torch.zeros(n, dtype=scores.dtype, device=h.device).index_put(
            (torch.cat(groups),), torch.cat(group_attention) / g
        )
        instance_logits = self._cam_logits(torch.softmax(scores, dim=0), h)
        aux: dict[str, torch.Tensor] = {}
        if label is not None:
            y = label.reshape(-1)[:1].to(h.device).long().expand(g)
            tier1 = F.cross_entropy(tier1_logits.float(), y)
            aux["tier1"] = self.tier1_weight * tier1
        return MILOutput(
            bag_logits=self.classifier(z2),
            bag_embedding=z2,
            instance_embeddings=h,
            attention=attention.unsqueeze(0),
            instance_logits=instance_logits,
            aux_losses=aux,
            extras={"tier1_logits": tier1_logits},
        )
