"""TransMIL (Shao et al., NeurIPS 2021) with a Nystrom self-attention written here.

The layout follows the paper: projection, square padding, a class token, a
Transformer layer, the pyramid position encoding generator (PPEG), a second
Transformer layer, a final LayerNorm and a linear classifier on the class token.
Each Transformer layer is ``x + MSA(LayerNorm(x))`` where the multi-head
self-attention is the Nystrom approximation (Xiong et al., AAAI 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tiahnm.errors import ConfigError
from tiahnm.heads.base import MILHead, MILOutput
from tiahnm.heads.options import KEY, HeadOptions
from tiahnm.utils.options import option, parse

#: Kernel of the depthwise convolution on the values (Nystromformer default).
RESIDUAL_CONV_KERNEL = 33


def iterative_pinv(x: torch.Tensor, n_iter: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of square matrices by iteration.

    The iteration of Razavi et al. (2014) used by the Nystromformer:
    ``Z <- Z (13 I - X Z (15 I - X Z (7 I - X Z))) / 4``, started from
    ``Z_0 = X^T / (max_i sum_j |x_ij| * max_j sum_i |x_ij|)`` (per matrix), which
    makes it converge for any ``X``.

    Args:
        x (torch.Tensor): ``[..., m, m]`` matrices.
        n_iter (int): Number of iterations (6 in TransMIL).

    Returns:
        torch.Tensor: ``[..., m, m]`` approximate pseudo-inverses.
    """
    abs_x = x.abs()
    row_max = abs_x.sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    col_max = abs_x.sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)
    z = x.transpose(-1, -2) / (row_max * col_max)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(n_iter):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of ``m`` contiguous, nearly equal segments of the sequence axis.

    The first ``n % m`` segments hold ``n // m + 1`` tokens, the others ``n // m``,
    so no zero padding enters the landmarks (the Nystromformer pads with zeros).

    Args:
        x (torch.Tensor): ``[H, n, d]``.
        m (int): Number of segments (landmarks), ``1 <= m <= n``.

    Returns:
        torch.Tensor: ``[H, m, d]``.
    """
    heads, n, d = x.shape
    size, rest = divmod(n, m)
    big = rest * (size + 1)
    parts = []
    if rest:
        parts.append(x[:, :big].reshape(heads, rest, size + 1, d).mean(dim=2))
    parts.append(x[:, big:].reshape(heads, m - rest, size, d).mean(dim=2))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nystrom approximation.

    For a sequence of ``n > num_landmarks`` tokens, ``softmax(Q K^T) V`` is
    approximated by ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V``
    where ``Q~``, ``K~`` are ``num_landmarks`` segment means. For ``n <=
    num_landmarks`` (the number of landmarks is clipped to the sequence length) each
    landmark is one token and the approximation equals exact attention up to the
    pseudo-inverse iteration error, so exact attention is computed instead. A
    depthwise convolution along the sequence on the values is added to the output
    (the Nystromformer's residual), then the heads are merged by a linear output
    projection followed by dropout.

    Args:
        dim (int): Token width ``E``.
        n_heads (int): Number of heads ``H`` (head width ``E / H``).
        num_landmarks (int): Number of landmarks.
        pinv_iterations (int): Iterations of :func:`iterative_pinv`.
        dropout (float): Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        *,
        n_heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            msg = f"embed_dim ({dim}) must be divisible by n_heads ({n_heads})."
            raise ConfigError(msg)
        if num_landmarks < 1 or pinv_iterations < 1:
            msg = (
                "num_landmarks and pinv_iterations must be >= 1, got "
                f"{num_landmarks}, {pinv_iterations}."
            )
            raise ConfigError(msg)
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = self.head_dim**-0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        k = RESIDUAL_CONV_KERNEL
        self.res_conv = nn.Conv2d(
            n_heads, n_heads, (k, 1), padding=(k // 2, 0), groups=n_heads, bias=False
        )

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend over ``x`` ``[n, E]``.

        Returns:
            tuple[torch.Tensor, torch.Tensor, torch.Tensor]: The output ``[n, E]``;
            the exact attention row of the first token (the class token)
            ``softmax(q_0 K^T)`` ``[H, n]``, which is cheap to compute exactly for
            any ``n``; the values ``[H, n, E / H]``.
        """
        n = x.shape[0]
        qkv = self.to_qkv(x).view(n, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each [H, n, d]
        q = q * self.scale
        if n <= self.num_landmarks:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            out = self._nystrom(q, k, v)
        out = out + self.res_conv(v.unsqueeze(0)).squeeze(0)
        cls_attention = torch.softmax(q[:, :1] @ k.transpose(-1, -2), dim=-1)[:, 0]
        out = out.permute(1, 0, 2).reshape(n, self.n_heads * self.head_dim)
        return self.dropout(self.to_out(out)), cls_attention, v

    def _nystrom(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_l: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Nystrom attention output ``[H, r, d]`` for the scaled queries ``q``.

        ``q`` ``[H, r, d]`` are the queries whose outputs are wanted (all tokens, or
        only the first); ``k``, ``v`` ``[H, n, d]``; ``q_l`` ``[H, m, d]`` are the
        landmark queries (default: segment means of ``q``, which must then hold all
        tokens). Computed in float32 with autocast off: the pseudo-inverse of the
        landmark kernel can have large entries that overflow half precision.
        """
        m = self.num_landmarks
        with torch.autocast(device_type=q.device.type, enabled=False):
            qf, kf, vf = q.float(), k.float(), v.float()
            q_l = segment_means(qf, m) if q_l is None else q_l.float()
            k_l = segment_means(kf, m)
            kernel1 = torch.softmax(qf @ k_l.transpose(-1, -2), dim=-1)  # [H, r, m]
            kernel2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # [H, m, m]
            kernel3 = torch.softmax(q_l @ kf.transpose(-1, -2), dim=-1)  # [H, m, n]
            kernel2_inv = iterative_pinv(kernel2, self.pinv_iterations)
            # Right to left: [m, m] @ [m, d] first costs n*m*d, not n*m*m.
            out = kernel1 @ (kernel2_inv @ (kernel3 @ vf))
        return out.to(v.dtype)

    def forward_first(self, x: torch.Tensor) -> torch.Tensor:
        """The output row of the first token only, ``[1, E]``, for the same ``x``.

        Equal to ``forward(x)[0][:1]`` (up to rounding): the first token's query
        meets every key and value, but the other queries are only needed through
        the landmarks, and a landmark query is a segment mean of queries, i.e. the
        projection of the segment mean of ``x`` (the query projection has no bias).
        Saves the query projection of all tokens, the ``n x m`` kernel, the output
        projection of all rows and most of the residual convolution.
        """
        n, e = x.shape
        w_q, w_k, w_v = self.to_qkv.weight.split(e, dim=0)
        heads, d = self.n_heads, self.head_dim

        def split(t: torch.Tensor) -> torch.Tensor:  # [r, E] -> [H, r, d]
            return t.view(t.shape[0], heads, d).transpose(0, 1)

        k = split(F.linear(x, w_k))
        v = split(F.linear(x, w_v))
        q0 = split(F.linear(x[:1], w_q)) * self.scale
        if n <= self.num_landmarks:
            out = torch.softmax(q0 @ k.transpose(-1, -2), dim=-1) @ v
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                means = segment_means(x.float()[None], self.num_landmarks)[0]
                q_l = split(F.linear(means, w_q.float())) * self.scale
            out = self._nystrom(q0, k, v, q_l=q_l)
        # The convolution along the sequence reaches k // 2 rows past the first.
        reach = RESIDUAL_CONV_KERNEL // 2 + 1
        conv = self.res_conv(v[:, :reach].unsqueeze(0)).squeeze(0)[:, :1]
        out = (out + conv).transpose(0, 1).reshape(1, heads * d)
        return self.dropout(self.to_out(out))


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))``."""

    def __init__(
        self,
        dim: int,
        *,
        n_heads: int,
        num_landmarks: int,
        pinv_iterations: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim,
            n_heads=n_heads,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=dropout,
        )

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output ``[n, E]``, class-token attention ``[H, n]`` and values."""
        out, cls_attention, values = self.attn(self.norm(x))
        return x + out, cls_attention, values

    def forward_first(self, x: torch.Tensor) -> torch.Tensor:
        """The first token's output row ``[1, E]`` (see ``forward_first``)."""
        return x[:1] + self.attn.forward_first(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convs on the token grid.

    The patch tokens (all but the first, the class token) are laid out row-major on
    a ``side x side`` grid; the output is ``g + conv7(g) + conv5(g) + conv3(g)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``x`` ``[1 + side^2, E]`` -> same shape."""
        cls_token, feats = x[:1], x[1:]
        grid = feats.T.reshape(1, -1, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls_token, grid.flatten(2)[0].T], dim=0)


@dataclass(frozen=True)
class TransMILOptions(HeadOptions):
    """Options of :class:`TransMIL` (``head.options``)."""

    n_heads: int = option(
        8, low=1, help="Attention heads (8: 64 dims per head at embed_dim 512)."
    )
    attn_dropout: float = option(
        0.1, low=0, high=1, help="Dropout after each attention output projection."
    )
    num_landmarks: int = option(
        256,
        low=1,
        help="Nystrom landmarks (clipped to the sequence length; sequences no longer "
        "than this use exact attention).",
    )
    pinv_iterations: int = option(6, low=1, help="Pseudo-inverse iterations.")


class TransMIL(MILHead):
    """TransMIL: correlated MIL with a two-layer Nystrom Transformer and PPEG.

    The ``N`` projected instances are padded to ``side^2`` tokens (``side =
    ceil(sqrt(N))``) by repeating the first ones, a learnt class token is prepended,
    and the class token after the final LayerNorm is classified.

    Outputs:

    * ``attention`` ``[H, N]``: the first layer's class-token attention per head,
      ``softmax(q_cls K^T)`` computed exactly (also when the layer itself uses the
      Nystrom approximation), restricted to the ``N`` real instances (no class
      token, no padding) and renormalised to sum to 1 per head.
    * ``bag_embedding``: the class token after the final LayerNorm ``[1, E]``.
    * ``extras["layer1_values"]``: the first layer's values of the real instances
      ``[H, N, E / H]``, used by the class-aware score.

    Instance logits (MHIM-v2 construction): for every instance, each head's value
    is weighted by that head's class-token attention (the ``attention`` output), the
    heads are concatenated, passed through the first layer's output projection
    (weight and bias) and then through the classifier. The residual convolution,
    PPEG and the second layer are left out, as in MHIM-v2.

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        **options: The options of :class:`TransMILOptions` (``embed_dim`` is the
            token width).
    """

    supported_scores = ("attention", "class_aware", "instance_prob", "instance_logit")
    default_eval_score = "instance_prob"

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        opts = parse(TransMILOptions, options, key=KEY)
        super().__init__(
            in_dim,
            n_classes,
            embed_dim=opts.embed_dim,
            dropout=opts.dropout,
            act=opts.act,
        )
        embed_dim = opts.embed_dim
        self.n_heads = opts.n_heads
        self.cls_token = nn.Parameter(torch.randn(1, embed_dim))
        layer_opts = {
            "n_heads": opts.n_heads,
            "num_landmarks": opts.num_landmarks,
            "pinv_iterations": opts.pinv_iterations,
            "dropout": opts.attn_dropout,
        }
        self.layer1 = TransLayer(embed_dim, **layer_opts)
        self.ppeg = PPEG(embed_dim)
        self.layer2 = TransLayer(embed_dim, **layer_opts)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, n_classes)

    @staticmethod
    def pad_to_square(h: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Pad ``h`` ``[N, E]`` to ``side^2`` rows by repeating its first rows.

        Returns:
            tuple[torch.Tensor, int]: The ``[side^2, E]`` tokens and ``side``.
        """
        n = h.shape[0]
        side = max(1, math.ceil(math.sqrt(n)))
        extra = side * side - n
        if extra == 0:
            return h, side
        idx = torch.arange(extra, device=h.device) % n
        return torch.cat([h, h.index_select(0, idx)], dim=0), side

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Run the Transformer on the padded sequence and classify the class token."""
        n = h.shape[0]
        tokens, side = self.pad_to_square(h)
        x = torch.cat([self.cls_token.to(tokens.dtype), tokens], dim=0)
        x, cls_attention, values = self.layer1(x)
        x = self.ppeg(x, side)
        # Only the class token leaves the last layer: compute that row alone.
        z = self.norm(self.layer2.forward_first(x))
        attention = cls_attention[:, 1 : n + 1]
        attention = attention / attention.sum(dim=-1, keepdim=True)
        return MILOutput(
            bag_logits=self.classifier(z),
            bag_embedding=z,
            instance_embeddings=h,
            attention=attention,
            extras={"layer1_values": values[:, 1 : n + 1]},
        )

    def _instance_logits(self, out: MILOutput) -> torch.Tensor:
        """Class-aware CAM logits ``[N, C]`` (MHIM-v2 construction, see class doc)."""
        if out.attention is None or "layer1_values" not in out.extras:
            msg = "TransMIL instance logits need the output of TransMIL.forward."
            raise ValueError(msg)
        values = out.extras["layer1_values"].float()  # [H, N, d]
        weighted = out.attention.float().unsqueeze(-1) * values
        n = weighted.shape[1]
        merged = weighted.permute(1, 0, 2).reshape(n, -1)  # [N, E]
        proj = self.layer1.attn.to_out
        z = F.linear(merged, proj.weight.float(), proj.bias.float())
        return F.linear(z, self.classifier.weight.float(), self.classifier.bias.float())
