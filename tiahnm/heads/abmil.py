"""Attention-based MIL (Ilse, Tomczak and Welling, ICML 2018), plain and gated.

Options from Li et al. (MICCAI 2019): ``attn_act="softsign"`` is their eq. 1
(``w^T softsign(U g)``) and ``adaptive_lambda`` their eq. 2 adaptive weighting of
pseudo-negative instances while training (see :mod:`tiahnm.heads.adaptive`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tiahnm.errors import ConfigError
from tiahnm.heads.adaptive import AdaptiveWeightingMixin
from tiahnm.heads.base import MILHead, MILOutput

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


class ABMIL(AdaptiveWeightingMixin, MILHead):
    """AB-MIL: attention-weighted mean of projected instances, then a linear classifier.

    With ``adaptive_lambda`` set, training pools with the weights of Li et al. eq. 2
    (softmax weights below the bag's mean weight multiplied by lambda); the output's
    ``attention`` stays the softmax weights of eq. 1 and the pooling weights are in
    ``extras["pooling_weights"]``. Evaluation always pools with plain attention.

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        embed_dim (int): Projection width ``E``.
        attn_dim (int): Hidden width of the attention MLP (128 in the paper).
        gated (bool): Gated attention.
        dropout (float): Dropout after the projection.
        act (str): ``relu`` or ``gelu``.
        attn_act (str): ``tanh`` (Ilse et al.) or ``softsign`` (Li et al. eq. 1).
        adaptive_lambda (float | None): lambda of Li et al. eq. 2 (2 in the paper);
            None turns adaptive weighting off.
        adaptive_renormalise (bool): Renormalise the eq. 2 weights to sum to 1 (not
            in the paper).
    """

    supported_scores = ("attention", "class_aware", "instance_prob", "instance_logit")
    default_eval_score = "instance_prob"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        embed_dim: int = 512,
        attn_dim: int = 128,
        gated: bool = False,
        dropout: float = 0.25,
        act: str = "relu",
        attn_act: str = "tanh",
        adaptive_lambda: float | None = None,
        adaptive_renormalise: bool = False,
    ) -> None:
        super().__init__(
            in_dim, n_classes, embed_dim=embed_dim, dropout=dropout, act=act
        )
        self._init_adaptive(adaptive_lambda, adaptive_renormalise=adaptive_renormalise)
        self.attention = AttentionPool(embed_dim, attn_dim, gated=gated, act=attn_act)
        self.classifier = nn.Linear(embed_dim, n_classes)

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
    """AB-MIL with gated attention (the same head with ``gated=True``)."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        embed_dim: int = 512,
        attn_dim: int = 128,
        dropout: float = 0.25,
        act: str = "relu",
        attn_act: str = "tanh",
        adaptive_lambda: float | None = None,
        adaptive_renormalise: bool = False,
    ) -> None:
        super().__init__(
            in_dim,
            n_classes,
            embed_dim=embed_dim,
            attn_dim=attn_dim,
            gated=True,
            dropout=dropout,
            act=act,
            attn_act=attn_act,
            adaptive_lambda=adaptive_lambda,
            adaptive_renormalise=adaptive_renormalise,
        )
