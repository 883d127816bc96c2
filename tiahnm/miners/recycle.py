"""Global Recycle Network (GRN) of MHIM-MIL v2.

After hard-instance masking, part of the remaining instances is dropped from the student
input at random; instead of discarding them, the GRN summarises them into ``k`` tokens
that are appended to the student's input:

``Z = MCA(query = LN(G), key = value = LN(X_rm))``, ``Z in R^{k x E}``

where ``G`` (``[k, E]``) are global query tokens that receive no gradient and follow an
exponential moving average of ``Z``: ``G <- mu * G + (1 - mu) * Z``. One LayerNorm is
shared by the queries and the keys/values. MCA is multi-head cross-attention with
query/key/value projections, attention dropout and an output ``Linear(E, E)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tiahnm.errors import ConfigError


class GlobalRecycleNetwork(nn.Module):
    """Cross-attention summary of recycled instances into ``k`` global tokens.

    Args:
        dim (int): Token width ``E`` (the head's embedding width).
        n_tokens (int): Number of global tokens ``k``.
        n_heads (int): Attention heads (``dim`` must be divisible by it).
        dropout (float): Dropout on the attention weights (training only).
        momentum (float): EMA momentum ``mu`` of the global tokens.
        key (str): Config key prefix for error messages.
    """

    def __init__(
        self,
        dim: int,
        n_tokens: int,
        *,
        n_heads: int = 8,
        dropout: float = 0.1,
        momentum: float = 0.9999,
        key: str = "miner.options",
    ) -> None:
        super().__init__()
        if dim % n_heads:
            msg = (
                f"{key}.recycle_heads: the embedding width {dim} is not divisible by "
                f"{n_heads} heads."
            )
            raise ConfigError(msg)
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.dropout = dropout
        self.momentum = momentum
        self.queries = nn.Parameter(torch.empty(n_tokens, dim), requires_grad=False)
        # Built without touching the global RNG; reset_parameters() initialises.
        with torch.random.fork_rng(devices=[]):
            self.norm = nn.LayerNorm(dim)
            self.to_q = nn.Linear(dim, dim)
            self.to_kv = nn.Linear(dim, 2 * dim)
            self.to_out = nn.Linear(dim, dim)
        self.reset_parameters(torch.Generator().manual_seed(0))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise in place from ``generator`` (the global RNG is left alone).

        The global tokens are ``U(-v, v)`` with ``v = sqrt(6 / (3 * 16 * 16 + E))``
        (VPT-style); linear layers get PyTorch's default ``U(-1/sqrt(fan_in),
        1/sqrt(fan_in))`` for weights and biases; the LayerNorm is the identity.
        """
        bound = math.sqrt(6.0 / (3 * 256 + self.dim))
        self.queries.uniform_(-bound, bound, generator=generator)
        for layer in (self.to_q, self.to_kv, self.to_out):
            b = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-b, b, generator=generator)
            layer.bias.uniform_(-b, b, generator=generator)
        self.norm.reset_parameters()

    @property
    def n_tokens(self) -> int:
        """Number of global tokens ``k``."""
        return self.queries.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Summarise ``x`` ``[M, E]`` (``M >= 1``) into ``Z`` ``[k, E]``."""
        k, m = self.n_tokens, x.shape[0]
        g = self.queries.to(x.dtype)
        q = self.to_q(self.norm(g)).view(k, self.n_heads, self.head_dim).transpose(0, 1)
        kv = self.to_kv(self.norm(x)).view(m, 2, self.n_heads, self.head_dim)
        keys, values = kv.permute(1, 2, 0, 3).unbind(0)  # each [H, M, d]
        z = F.scaled_dot_product_attention(
            q, keys, values, dropout_p=self.dropout if self.training else 0.0
        )  # [H, k, d]
        return self.to_out(z.transpose(0, 1).reshape(k, self.dim))

    @torch.no_grad()
    def update_queries(self, z: torch.Tensor) -> None:
        """EMA step ``G <- mu * G + (1 - mu) * z`` with ``z`` ``[k, E]`` (detached)."""
        g = self.queries
        g.mul_(self.momentum).add_(z.detach().to(g.dtype), alpha=1.0 - self.momentum)


__all__ = ["GlobalRecycleNetwork"]
