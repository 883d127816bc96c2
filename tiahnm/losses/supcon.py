"""Supervised contrastive loss (Khosla et al. 2020) with ItS2CLR / HNM-WSI pair modes.

For ``n`` samples with ``V`` views (``2n`` anchors for two views), normalised
embeddings ``z`` and logits ``l_ij = <z_i, z_j> / T``:

* positives ``M_ij = [y_i == y_j]``, restricted by the pair mode: ``all`` keeps them
  all (plain SupCon); ``neg`` keeps only pairs of pseudo-negatives (``y = 0``: step A
  of the ItS2CLR encoder epoch); ``pos`` only pairs of pseudo-positives (step B);
* the denominator of anchor ``i`` runs over every ``a != i``; with
  ``mask_uncertain_neg`` it also drops the columns of *uncertain negatives* (``y = 0``
  in a positive bag, ``bag_label = 1``), which are then no positive either;
* ``L_i = -(T / T_b) / |P(i)| * sum_{p in P(i)} [l_ip - log sum_a exp(l_ia)]`` and the
  loss is the mean over **all** anchors: anchors without positives count as 0, as in
  the official code.

The official code does not subtract the row maximum; the log-sum-exp here does, which
gives the same values (up to the official ``1e-10`` inside the log) without overflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tiahnm.losses.base import BatchLoss
from tiahnm.utils.options import Options, option, parse

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.heads.base import MILHead, MILOutput

PAIR_MODES = ("all", "neg", "pos")


def supcon_loss(
    views: torch.Tensor,
    labels: torch.Tensor,
    *,
    bag_labels: torch.Tensor | None = None,
    pair_mode: str = "all",
    mask_uncertain_neg: bool = False,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    normalize: bool = True,
) -> torch.Tensor:
    """Supervised contrastive loss of ``n`` samples seen in ``V`` views.

    Args:
        views (torch.Tensor): ``[n, V, d]`` embeddings (``[n, d]`` for one view).
        labels (torch.Tensor): ``[n]`` (pseudo-)labels.
        bag_labels (torch.Tensor | None): ``[n]`` labels of the samples' bags, needed
            by ``mask_uncertain_neg``.
        pair_mode (str): ``all``, ``neg`` or ``pos`` (see the module docstring).
        mask_uncertain_neg (bool): Remove uncertain negatives (``label 0`` in a bag of
            label 1) from every denominator and positive set.
        temperature (float): ``T`` (0.07).
        base_temperature (float): ``T_b`` (0.07); the loss is scaled by ``T / T_b``.
        normalize (bool): L2-normalise the embeddings first.

    Returns:
        torch.Tensor: Scalar loss (0 when no anchor has a positive).

    Raises:
        ValueError: Bad shapes, pair mode or temperature.
    """
    if pair_mode not in PAIR_MODES:
        msg = f"pair_mode must be one of {', '.join(PAIR_MODES)}, got {pair_mode!r}."
        raise ValueError(msg)
    if temperature <= 0 or base_temperature <= 0:
        msg = f"temperatures must be > 0, got {temperature}, {base_temperature}."
        raise ValueError(msg)
    if views.dim() == 2:
        views = views.unsqueeze(1)
    if views.dim() != 3 or views.shape[0] != labels.numel():
        msg = (
            f"views must be [n, V, d] with n = len(labels) = {labels.numel()}, "
            f"got {list(views.shape)}."
        )
        raise ValueError(msg)
    n, n_views, _ = views.shape
    z = views.float()
    if normalize:
        z = F.normalize(z, dim=-1)
    # View-major order (all samples of view 0, then view 1 ...), as the official code.
    z = torch.cat(torch.unbind(z, dim=1), dim=0)
    y = labels.reshape(-1).to(z.device)
    keep_row = torch.ones(n, dtype=torch.bool, device=z.device)
    if pair_mode == "neg":
        keep_row = y == 0
    elif pair_mode == "pos":
        keep_row = y == 1
    pos = (y[:, None] == y[None, :]) & keep_row[:, None] & keep_row[None, :]
    pos = pos.repeat(n_views, n_views)
    m = n * n_views
    denom = ~torch.eye(m, dtype=torch.bool, device=z.device)
    if mask_uncertain_neg:
        if bag_labels is None:
            msg = "mask_uncertain_neg needs bag_labels."
            raise ValueError(msg)
        uncertain = (bag_labels.reshape(-1).to(z.device) == 1) & (y == 0)
        denom &= ~uncertain.repeat(n_views)[None, :]
    pos &= denom
    logits = z @ z.T / temperature
    masked = logits.masked_fill(~denom, float("-inf"))
    # An anchor with an empty denominator has no positive either; keep it finite.
    masked = torch.where(denom.any(1, keepdim=True), masked, torch.zeros_like(masked))
    log_denom = torch.logsumexp(masked, dim=1, keepdim=True)
    log_prob = torch.where(pos, logits - log_denom, torch.zeros_like(logits))
    n_pos = pos.sum(1).float()
    mean_log_prob = log_prob.sum(1) / (n_pos + 1e-10)
    return -(temperature / base_temperature) * mean_log_prob.mean()


@dataclass(frozen=True)
class SupConOptions(Options):
    """Options of :class:`SupConLoss` (``losses[i].options``)."""

    temperature: float = option(0.07, low=0, open_low=True, help="T.")
    base_temperature: float = option(0.07, low=0, open_low=True, help="T_b.")
    pair_mode: str = option(
        "all", choices=PAIR_MODES, help="Pairs contrasted: all, neg or pos."
    )


class SupConLoss(BatchLoss):
    """SupCon over the bag embeddings of a step's batch (bag labels as classes).

    The ``hnm`` miner calls :func:`supcon_loss` directly on patch embeddings with
    pseudo-labels; as a loss plugin it pulls together the bag embeddings of the same
    class within a batch (useful with batches of several bags, e.g. ``hnm``'s
    positive/negative pairs plus more bags per step). Batches of one bag give ``None``.
    Takes the options of :class:`SupConOptions`.
    """

    def __init__(self, **options: Any) -> None:
        opts = parse(SupConOptions, options, key="losses[supcon].options")
        self.temperature = opts.temperature
        self.base_temperature = opts.base_temperature
        self.pair_mode = opts.pair_mode

    def __call__(
        self, head: MILHead, outputs: Sequence[MILOutput], labels: Sequence[int]
    ) -> torch.Tensor | None:
        """SupCon of the batch's bag embeddings, or ``None`` for fewer than 2 bags."""
        if len(outputs) < 2:
            return None
        z = torch.stack([o.bag_embedding.float().reshape(-1) for o in outputs])
        y = torch.tensor(list(labels), device=z.device)
        return supcon_loss(
            z,
            y,
            pair_mode=self.pair_mode,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
        )


__all__ = ["PAIR_MODES", "SupConLoss", "supcon_loss"]
