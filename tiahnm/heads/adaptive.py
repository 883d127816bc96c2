"""Instance-level adaptive weighting of attention (Li et al., MICCAI 2019, eq. 2).

Li et al. pool a bag with softmax attention ``w_ij`` (their eq. 1) and, while training,
enlarge the contribution of the *pseudo-negative* instances by ``lambda``:

``z_i = sum_{j not in N_in} w_ij g_ij + lambda * sum_{j in N_in} w_ij g_ij``  (eq. 2)

"In each iteration, the instances are treated as pseudo negative by thresholding on
the average weights in each cycle." Our reading, implemented here:

* pseudo negatives are the instances whose attention is strictly below the bag's
  average attention (``1 / N`` for softmax weights), recomputed at every forward pass
  (every iteration) from the current weights, per attention branch;
* the selection is a hard, non-differentiable mask (taken on detached weights); the
  gradient flows through the weights themselves (``lambda * w_ij`` for pseudo
  negatives, ``w_ij`` for the others);
* eq. 2 has no renormalisation: the pooling weights sum to ``1 + (lambda - 1) *
  sum_{N_in} w_ij``. ``renormalise=True`` divides them by their sum instead (not in the
  paper; offered for ablations);
* training only: at evaluation the plain attention of eq. 1 pools the bag. The paper
  says the weighting serves "balanced training"; with ``lambda > 1`` the amplified
  pseudo-negative terms push the attention network to lower those weights further
  ("the weights of the pseudo negative instances will be reduced"), which sharpens the
  weights used later to mine hard negatives.

Any head that pools with softmax attention ``[H, N]`` can call
:func:`adaptive_weights` on its weights before pooling (AB-MIL does).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tiahnm.errors import ConfigError


def pseudo_negative_mask(attention: torch.Tensor) -> torch.Tensor:
    """Instances whose attention is below their bag's average attention.

    Args:
        attention (torch.Tensor): ``[H, N]`` (or ``[N]``) softmax weights, one row per
            attention branch.

    Returns:
        torch.Tensor: Boolean mask of the same shape (no gradient).
    """
    a = attention.detach()
    return a < a.mean(dim=-1, keepdim=True)


def adaptive_weights(
    attention: torch.Tensor, lam: float, *, renormalise: bool = False
) -> torch.Tensor:
    """Pooling weights of eq. 2: pseudo-negative weights multiplied by ``lam``.

    Args:
        attention (torch.Tensor): ``[H, N]`` (or ``[N]``) softmax weights.
        lam (float): lambda (2 in the paper).
        renormalise (bool): Divide the result by its sum over instances (not in the
            paper).

    Returns:
        torch.Tensor: Weights of the same shape, differentiable w.r.t. ``attention``.
    """
    mask = pseudo_negative_mask(attention)
    scale = torch.where(
        mask,
        torch.full_like(attention, float(lam)),
        torch.ones_like(attention),
    )
    w = attention * scale
    if renormalise:
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def check_adaptive_lambda(
    value: Any, key: str = "head.options.adaptive_lambda"
) -> float | None:
    """Validate an ``adaptive_lambda`` option: ``None`` (off) or a finite number > 0."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        msg = f"{key} must be null (off) or a finite number > 0, got {value!r}."
        raise ConfigError(msg)
    return float(value)


class AdaptiveWeightingMixin:
    """Adds eq. 2 adaptive weighting to a head that pools with softmax attention.

    The head calls :meth:`_init_adaptive` in ``__init__`` and passes its softmax
    weights through :meth:`pooling_weights` before pooling. The weighting is applied
    only while ``self.training`` is true.
    """

    adaptive_lambda: float | None = None
    adaptive_renormalise: bool = False

    def _init_adaptive(
        self, adaptive_lambda: float | None, *, adaptive_renormalise: bool
    ) -> None:
        self.adaptive_lambda = check_adaptive_lambda(adaptive_lambda)
        if not isinstance(adaptive_renormalise, bool):
            msg = (
                "head.options.adaptive_renormalise must be true or false, got "
                f"{adaptive_renormalise!r}."
            )
            raise ConfigError(msg)
        self.adaptive_renormalise = adaptive_renormalise

    def adaptive_active(self) -> bool:
        """True when eq. 2 applies to the next forward pass (training, lambda set)."""
        return self.adaptive_lambda is not None and bool(
            getattr(self, "training", False)
        )

    def pooling_weights(self, attention: torch.Tensor) -> torch.Tensor:
        """The weights to pool with: eq. 2 while training, else ``attention``."""
        if not self.adaptive_active():
            return attention
        assert self.adaptive_lambda is not None
        return adaptive_weights(
            attention, self.adaptive_lambda, renormalise=self.adaptive_renormalise
        )


__all__ = [
    "AdaptiveWeightingMixin",
    "adaptive_weights",
    "check_adaptive_lambda",
    "pseudo_negative_mask",
]
