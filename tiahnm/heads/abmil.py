"""Attention-based MIL (Ilse, Tomczak and Welling, ICML 2018), plain and gated."""

from __future__ import annotations

import torch
from torch import nn

from tiahnm.heads.base import MILHead, MILOutput


class AttentionPool(nn.Module):
    """``e_i = w^T tanh(V h_i)`` or, gated, ``w^T (tanh(V h_i) * sigmoid(U h_i))``."""

    def __init__(
        self, embed_dim: int, attn_dim: int, *, gated: bool, n_branches: int = 1
    ) -> None:
        super().__init__()
        self.V = nn.Linear(embed_dim, attn_dim)
        self.U = nn.Linear(embed_dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Raw attention scores ``[n_branches, N]`` (before the softmax)."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(a).T


class ABMIL(MILHead):
    """AB-MIL: attention-weighted mean of projected instances, then a linear classifier.

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        embed_dim (int): Projection width ``E``.
        attn_dim (int): Hidden width of the attention MLP (128 in the paper).
        gated (bool): Gated attention.
        dropout (float): Dropout after the projection.
        act (str): ``relu`` or ``gelu``.
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
    ) -> None:
        super().__init__(
            in_dim, n_classes, embed_dim=embed_dim, dropout=dropout, act=act
        )
        self.attention = AttentionPool(embed_dim, attn_dim, gated=gated)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def attention_weights(self, h: torch.Tensor) -> torch.Tensor:
        """Softmax attention ``[1, N]`` over the projected instances."""
        return torch.softmax(self.attention(h), dim=-1)

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Attention pooling."""
        a = self.attention_weights(h)
        z = a @ h
        return MILOutput(
            bag_logits=self.classifier(z),
            bag_embedding=z,
            instance_embeddings=h,
            attention=a,
        )


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
    ) -> None:
        super().__init__(
            in_dim,
            n_classes,
            embed_dim=embed_dim,
            attn_dim=attn_dim,
            gated=True,
            dropout=dropout,
            act=act,
        )
