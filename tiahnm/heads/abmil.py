"""Attention-based MIL (Ilse, Tomczak and Welling, ICML 2018), plain and gated.

Options from Li et al. (MICCAI 2019): ``attn_act="softsign"`` is their eq. 1
(``w^T softsign(U g)``) and ``adaptive_lambda`` their eq. 2 adaptive weighting of
pseudo-negative instances while training (see :mod:`tiahnm.heads.adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tiahnm.errors import ConfigError
from tiahnm.heads.adaptive import AdaptiveWeightingMixin
from tiahnm.heads.base import MILHead, MILOutput
from tiahnm.heads.options import KEY, HeadOptions
from tiahnm.utils.options import option, parse

ATTN_ACTS = ("tanh", "softsign")


class AttentionPool(nn.Module):
    """``e_i = w^T tanh(V h_i)`` or, gated, ``w^T (tanh(V h_i) * sigmoid(U h_i))``.

    ``act="softsign"`` replaces the tanh by ``x / (1 + |x|)`` (Li et al. 2019, eq. 1).
    """

    def __init__(
        self,
        embed_dim: int,
        attn_dim: int,
        *,
        gated: bool,
        n_branches: int = 1,
        act: str = "tanh",
    ) -> None:
        super().__init__()
        if act not in ATTN_ACTS:
            msg = f"head.options.attn_act must be 'tanh' or 'softsign', got {act!r}."
            raise ConfigError(msg)
        self.act = act
        self.V = nn.Linear(embed_dim, attn_dim)
        self.U = nn.Linear(embed_dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Raw attention scores ``[n_branches, N]`` (``[B, n_branches, N]`` for ``[B, N, E]``)."""
        v = self.V(h)
        a = torch.tanh(v) if self.act == "tanh" else F.softsign(v)
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(a).transpose(-1, -2)


@dataclass(frozen=True)
class GatedABMILOptions(HeadOptions):
    """Options of :class:`GatedABMIL` (``head.options``)."""

    attn_dim: int = option(
        128, low=1, help="Hidden width of the attention MLP (128 in the paper)."
    )
    attn_act: str = option(
        "tanh",
        choices=ATTN_ACTS,
        help="tanh (Ilse et al.) or softsign (Li et al. eq. 1).",
    )
    adaptive_lambda: float | None = option(
        None,
        low=0,
        open_low=True,
        help="lambda of Li et al. eq. 2 (2 in the paper); null turns adaptive "
        "weighting off.",
    )
    adaptive_renormalise: bool = option(
        default=False,
        help="Renormalise the eq. 2 weights to sum to 1 (not in the paper).",
    )


@dataclass(frozen=True)
class ABMILOptions(GatedABMILOptions):
    """Options of :class:`ABMIL` (``head.options``)."""

    gated: bool = option(default=False, help="Gated attention.")


class ABMIL(AdaptiveWeightingMixin, MILHead):
    """AB-MIL: attention-weighted mean of projected instances, then a linear classifier.

    With ``adaptive_lambda`` set, training pools with the weights of Li et al. eq. 2
    (softmax weights below the bag's mean weight multiplied by lambda); the output's
    ``attention`` stays the softmax weights of eq. 1 and the pooling weights are in
    ``extras["pooling_weights"]``. Evaluation always pools with plain attention.

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        **options: The options of :class:`ABMILOptions`.
    """

    supported_scores = ("attention", "class_aware", "instance_prob", "instance_logit")
    default_eval_score = "instance_prob"

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        opts = parse(ABMILOptions, options, key=KEY)
        super().__init__(
            in_dim,
            n_classes,
            embed_dim=opts.embed_dim,
            dropout=opts.dropout,
            act=opts.act,
        )
        self._init_adaptive(
            opts.adaptive_lambda, adaptive_renormalise=opts.adaptive_renormalise
        )
        self.attention = AttentionPool(
            opts.embed_dim, opts.attn_dim, gated=opts.gated, act=opts.attn_act
        )
        self.classifier = nn.Linear(opts.embed_dim, n_classes)

    def attention_weights(self, h: torch.Tensor) -> torch.Tensor:
        """Softmax attention ``[1, N]`` over the projected instances."""
        return torch.softmax(self.attention(h), dim=-1)

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Attention pooling (eq. 2 adaptive weights while training, if enabled)."""
        a = self.attention_weights(h)
        w = self.pooling_weights(a)
        z = w @ h
        extras = {"pooling_weights": w} if w is not a else {}
        return MILOutput(
            bag_logits=self.classifier(z),
            bag_embedding=z,
            instance_embeddings=h,
            attention=a,
            extras=extras,
        )

    def supports_padding(self) -> bool:
        """Padded batches are supported unless adaptive weighting is on."""
        return self.adaptive_lambda is None

    def forward_padded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bag logits ``[B, C]`` of a padded batch.

        Args:
            x (torch.Tensor): ``[B, N_max, D]`` features, zero-padded.
            mask (torch.Tensor): ``[B, N_max]`` bool, True for real instances.
        """
        h = self.embed(x)
        scores = self.attention(h).masked_fill(~mask[:, None, :], float("-inf"))
        a = torch.softmax(scores, dim=-1)
        return self.classifier((a @ h)[:, 0])


class GatedABMIL(ABMIL):
    """AB-MIL with gated attention (the same head with ``gated=True``).

    Takes the options of :class:`GatedABMILOptions` (those of AB-MIL but ``gated``).
    """

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        parse(GatedABMILOptions, options, key=KEY)  # refuses ``gated``
        super().__init__(in_dim, n_classes, gated=True, **options)
