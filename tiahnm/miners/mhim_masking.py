"""Pure masking and schedule functions of MHIM-MIL (no module state).

Every ratio is the fraction of the bag that is *dropped* (MHIM convention). Counts are
``ceil(ratio * N)`` (computed after rounding ``ratio * N`` to 9 decimals, so that
``0.3 * 10`` counts 3 and not 4). Scores are teacher scores, ``[N]`` or ``[H, N]`` for
H heads; multi-head top-k sets are fused by ``vote`` (each head votes for its own top-k,
the k instances with the most votes win, ties broken by the head-mean score) or by
``mean`` (top-k of the head-mean score).

Randomness comes only from the ``generator`` argument (a CPU generator); random index
draws are made on the CPU and moved to the device of the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FUSIONS = ("vote", "mean")


def ratio_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)`` robust to float error, clipped to ``[0, n]``.

    Args:
        ratio (float): Fraction in ``[0, 1]``.
        n (int): Number of instances.

    Returns:
        int: The count.
    """
    if ratio <= 0.0 or n <= 0:
        return 0
    return min(n, math.ceil(round(ratio * n, 9)))


def floor_count(ratio: float, n: int) -> int:
    """``floor(ratio * n)`` robust to float error, clipped to ``[0, n]``."""
    if ratio <= 0.0 or n <= 0:
        return 0
    return min(n, math.floor(round(ratio * n, 9)))


def cosine_schedule(base: float, final: float, step: int, total: int) -> float:
    """Cosine interpolation from ``base`` (step 0) to ``final`` (step ``total``).

    ``final + (base - final) * (1 + cos(pi * step / total)) / 2``; steps past
    ``total`` give ``final``.

    Args:
        base (float): Value at step 0.
        final (float): Value at step ``total``.
        step (int): Current step (0-based).
        total (int): Number of steps of the schedule.

    Returns:
        float: The scheduled value.
    """
    if total <= 0:
        return base
    t = min(max(step, 0), total) / total
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def _as_2d(scores: torch.Tensor) -> torch.Tensor:
    if scores.dim() == 1:
        return scores.unsqueeze(0)
    if scores.dim() != 2:
        msg = f"Scores must be [N] or [H, N], got {tuple(scores.shape)}."
        raise ValueError(msg)
    return scores


def fused_topk(
    scores: torch.Tensor, k: int, *, largest: bool = True, fusion: str = "vote"
) -> torch.Tensor:
    """Indices of the ``k`` top (or bottom) instances, fusing heads.

    Args:
        scores (torch.Tensor): ``[N]`` or ``[H, N]`` scores.
        k (int): Number of indices (clipped to ``[0, N]``).
        largest (bool): Top (True) or bottom (False) scores.
        fusion (str): ``vote`` or ``mean`` for ``H > 1``.

    Returns:
        torch.Tensor: ``[k]`` long indices (unordered set).
    """
    s = _as_2d(scores).float()
    heads, n = s.shape
    k = max(0, min(k, n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=s.device)
    if heads == 1 or fusion == "mean":
        return torch.topk(s.mean(0), k, largest=largest, sorted=False).indices
    if fusion != "vote":
        msg = f"fusion must be one of {FUSIONS}, got {fusion!r}."
        raise ValueError(msg)
    per_head = torch.topk(s, k, dim=1, largest=largest, sorted=False).indices
    votes = torch.zeros(n, dtype=torch.float64, device=s.device)
    votes.scatter_add_(
        0,
        per_head.reshape(-1),
        torch.ones(heads * k, dtype=votes.dtype, device=s.device),
    )
    # Tie-break by the head-mean score: its rank (0 = least preferred) is < n, so
    # ``votes * n + rank`` orders by votes first; exact in float64.
    mean = s.mean(0)
    order = torch.argsort(mean, descending=not largest, stable=True)
    rank = torch.empty(n, dtype=torch.float64, device=s.device)
    rank[order] = torch.arange(n, dtype=torch.float64, device=s.device)
    key = votes * n + rank
    return torch.topk(key, k, sorted=False).indices


def high_mask(
    scores: torch.Tensor,
    ratio_h: float,
    ratio_hr: float,
    *,
    generator: torch.Generator | None = None,
    fusion: str = "vote",
) -> torch.Tensor:
    """High-score masking, "randomly HAM".

    The candidates are the top ``ceil(N * ratio_h / ratio_hr)`` instances; a uniformly
    random ``ceil(ratio_hr * |candidates|)`` of them are masked. ``ratio_hr = 1`` is
    plain HAM (the top ``ceil(ratio_h * N)``). If ``ratio_h / ratio_hr > 1`` every
    instance is a candidate and ``ceil(ratio_h * N)`` are masked.

    Args:
        scores (torch.Tensor): ``[N]`` or ``[H, N]`` teacher scores.
        ratio_h (float): Fraction masked (beta_h).
        ratio_hr (float): Fraction of the candidates masked (rho_h, in ``(0, 1]``).
        generator (torch.Generator | None): Random source of the subset.
        fusion (str): Multi-head fusion.

    Returns:
        torch.Tensor: Masked indices (long, on the device of ``scores``).
    """
    n = scores.shape[-1]
    if ratio_h <= 0.0 or n == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if ratio_h / ratio_hr >= 1.0:
        n_cand, n_mask = n, ratio_count(ratio_h, n)
    else:
        n_cand = ratio_count(ratio_h / ratio_hr, n)
        n_mask = ratio_count(ratio_hr, n_cand)
    cand = fused_topk(scores, n_cand, largest=True, fusion=fusion)
    if n_mask >= n_cand:
        return cand
    pick = torch.randperm(n_cand, generator=generator)[:n_mask]
    return cand.index_select(0, pick.to(cand.device, non_blocking=True))


def low_mask(
    scores: torch.Tensor, ratio_l: float, *, fusion: str = "vote"
) -> torch.Tensor:
    """The ``ceil(ratio_l * N)`` lowest-score instances."""
    k = ratio_count(ratio_l, scores.shape[-1])
    return fused_topk(scores, k, largest=False, fusion=fusion)


def random_mask(
    n: int,
    ratio_r: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A uniformly random ``ceil(ratio_r * n)`` instances."""
    k = ratio_count(ratio_r, n)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.randperm(n, generator=generator)[:k].to(device, non_blocking=True)


@dataclass
class MaskResult:
    """Outcome of :func:`build_mask`.

    Attributes:
        keep_idx (torch.Tensor): Kept instances, ascending.
        high_idx (torch.Tensor): High-score masked set.
        low_idx (torch.Tensor): Low-score masked set.
        random_idx (torch.Tensor): Random masked set.
        restored (int): 1 if an instance was restored because the union covered the
            whole bag, else 0.
    """

    keep_idx: torch.Tensor
    high_idx: torch.Tensor
    low_idx: torch.Tensor
    random_idx: torch.Tensor
    restored: int = 0


def build_mask(
    scores: torch.Tensor,
    *,
    ratio_h: float = 0.0,
    ratio_hr: float = 1.0,
    ratio_l: float = 0.0,
    ratio_r: float = 0.0,
    generator: torch.Generator | None = None,
    fusion: str = "vote",
) -> MaskResult:
    """Union of the random, low-score and high-score masks; keep the rest.

    Draw order on ``generator``: the random set first, then the HAM subset. Masked sets
    may overlap and are not refilled. The kept indices are ascending (the order matters
    to position-aware heads such as TransMIL). If the union covers the whole bag, one
    instance is restored: a uniformly random instance outside the high-score set, or
    the lowest-scored instance if the high-score set is the whole bag.

    Args:
        scores (torch.Tensor): ``[N]`` or ``[H, N]`` teacher scores (no gradient).
        ratio_h (float): beta_h, high-score fraction masked.
        ratio_hr (float): rho_h, randomly-HAM fraction of the candidates masked.
        ratio_l (float): beta_l, low-score fraction masked.
        ratio_r (float): beta_r, random fraction masked.
        generator (torch.Generator | None): CPU random source.
        fusion (str): Multi-head fusion (``vote`` or ``mean``).

    Returns:
        MaskResult: The kept and masked index sets.
    """
    scores = scores.detach()
    n = scores.shape[-1]
    device = scores.device
    rand_idx = random_mask(n, ratio_r, generator=generator, device=device)
    low_idx = low_mask(scores, ratio_l, fusion=fusion)
    high_idx = high_mask(scores, ratio_h, ratio_hr, generator=generator, fusion=fusion)
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    for idx in (rand_idx, low_idx, high_idx):
        if idx.numel():
            mask[idx] = True
    keep = torch.nonzero(~mask).squeeze(1)
    restored = 0
    if keep.numel() == 0 and n > 0:
        restored = 1
        high = torch.zeros(n, dtype=torch.bool, device=device)
        high[high_idx] = True
        outside = torch.nonzero(~high).squeeze(1)
        if outside.numel():
            pick = torch.randint(outside.numel(), (1,), generator=generator)
            keep = outside.index_select(0, pick.to(device))
        else:
            keep = fused_topk(scores, 1, largest=False, fusion=fusion)
    return MaskResult(
        keep_idx=keep,
        high_idx=high_idx,
        low_idx=low_idx,
        random_idx=rand_idx,
        restored=restored,
    )


__all__ = [
    "FUSIONS",
    "MaskResult",
    "build_mask",
    "cosine_schedule",
    "floor_count",
    "fused_topk",
    "high_mask",
    "low_mask",
    "random_mask",
    "ratio_count",
]
