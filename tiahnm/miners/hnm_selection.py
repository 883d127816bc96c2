"""Patch pools of HNM-WSI / ItS2CLR encoder fine-tuning, from instance pseudo-scores.

Every function works on the flat table of all training patches: ``scores`` ``[M]``
(pseudo-scores in ``[0, 1]`` from the MIL head's instance classifier) and
``bag_labels`` ``[M]`` (the label of each patch's slide). ``Q_q`` is numpy's
``quantile`` with linear interpolation, as the official code.

* pseudo-label ``y_i = 1`` iff ``bag_label = 1`` and ``s_i > threshold``;
* positives ``pos_full = {bag 1, s > threshold}``; the self-paced subset
  ``pos_spl(r) = {i in pos_full : s_i >= Q_{1-r}(s of pos_full)}``;
* hard negatives ``H(rho) = {bag 0, s_i >= Q_{1-rho}(s of every negative-slide
  patch)}``: the top ``rho`` fraction of negative-slide patches by score (ties at the
  cut-off are all kept); ``rho = 1`` is every negative-slide patch (ItS2CLR);
* uncertain negatives ``U(r) = {bag 1, s <= threshold, s <= Q_r(s of those)}``; empty
  for ``r = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _quantile(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, min(max(q, 0.0), 1.0)))


def pseudo_labels(
    scores: np.ndarray, bag_labels: np.ndarray, threshold: float
) -> np.ndarray:
    """``[M]`` int pseudo-labels: 1 iff the patch's bag is positive and ``s > threshold``."""
    s = np.asarray(scores, dtype=np.float64)
    return ((np.asarray(bag_labels) == 1) & (s > threshold)).astype(np.int64)


def hard_negative_mask(
    scores: np.ndarray, bag_labels: np.ndarray, ratio: float
) -> np.ndarray:
    """``[M]`` mask of ``H(ratio)``: the top ``ratio`` of negative-slide patches.

    Args:
        scores (np.ndarray): ``[M]`` pseudo-scores.
        bag_labels (np.ndarray): ``[M]`` slide labels.
        ratio (float): Fraction ``rho`` in ``(0, 1]`` (0.05 is HNM's headline).

    Returns:
        np.ndarray: Boolean mask; empty selection when there is no negative slide.
    """
    if not 0.0 < ratio <= 1.0:
        msg = f"hard-negative ratio must be in (0, 1], got {ratio}."
        raise ValueError(msg)
    s = np.asarray(scores, dtype=np.float64)
    neg = np.asarray(bag_labels) == 0
    if not neg.any():
        return np.zeros(s.shape, dtype=bool)
    cut = _quantile(s[neg], 1.0 - ratio)
    return neg & (s >= cut)


def positive_mask(
    scores: np.ndarray, bag_labels: np.ndarray, threshold: float, ratio: float = 1.0
) -> np.ndarray:
    """``[M]`` mask of ``pos_spl(ratio)`` (``ratio = 1``: all of ``pos_full``)."""
    s = np.asarray(scores, dtype=np.float64)
    full = pseudo_labels(s, bag_labels, threshold).astype(bool)
    if ratio <= 0 or not full.any():
        return np.zeros(s.shape, dtype=bool)
    if ratio >= 1:
        return full
    return full & (s >= _quantile(s[full], 1.0 - ratio))


def uncertain_negative_mask(
    scores: np.ndarray, bag_labels: np.ndarray, threshold: float, ratio: float
) -> np.ndarray:
    """``[M]`` mask of ``U(ratio)``: the lowest-scored pseudo-negatives of positive slides."""
    s = np.asarray(scores, dtype=np.float64)
    unc = (np.asarray(bag_labels) == 1) & (s <= threshold)
    if ratio <= 0 or not unc.any():
        return np.zeros(s.shape, dtype=bool)
    return unc & (s <= _quantile(s[unc], ratio))


def spl_ratio(
    epoch: int, *, start: float, end: float, warmup: int, ramp_epochs: int
) -> float:
    """Self-paced ratio: ``start`` until ``warmup``, then linear to ``end`` over ``ramp_epochs``.

    ``r(t) = start + (t - warmup) (end - start) / ramp_epochs`` for ``t >= warmup``,
    clipped to ``end`` (ItS2CLR's schedule with ``ramp_epochs = T - warmup``).
    """
    if epoch < warmup:
        return start
    frac = min(1.0, (epoch - warmup) / max(ramp_epochs, 1))
    return start + frac * (end - start)


@dataclass
class Pools:
    """Flat patch indices of one fine-tuning epoch.

    Attributes:
        labels (np.ndarray): ``[M]`` pseudo-labels of every patch.
        positives (np.ndarray): ``pos_full`` (step A's positive batches).
        spl_positives (np.ndarray): ``pos_spl(r)`` (step B).
        hard_negatives (np.ndarray): ``H(rho)``.
        uncertain (np.ndarray): ``U(r_neg)``.
        negatives (np.ndarray): The negative pool the epoch iterates over: ``H``, plus
            ``U`` unless uncertain negatives are masked.
    """

    labels: np.ndarray
    positives: np.ndarray
    spl_positives: np.ndarray
    hard_negatives: np.ndarray
    uncertain: np.ndarray
    negatives: np.ndarray


def build_pools(
    scores: np.ndarray,
    bag_labels: np.ndarray,
    *,
    threshold: float,
    neg_ratio: float,
    pos_ratio: float,
    uncertain_ratio: float,
    include_uncertain: bool,
) -> Pools:
    """All pools of one epoch (indices in ascending order)."""
    hard = hard_negative_mask(scores, bag_labels, neg_ratio)
    unc = uncertain_negative_mask(scores, bag_labels, threshold, uncertain_ratio)
    neg = hard | unc if include_uncertain else hard
    return Pools(
        labels=pseudo_labels(scores, bag_labels, threshold),
        positives=np.flatnonzero(positive_mask(scores, bag_labels, threshold, 1.0)),
        spl_positives=np.flatnonzero(
            positive_mask(scores, bag_labels, threshold, pos_ratio)
        ),
        hard_negatives=np.flatnonzero(hard),
        uncertain=np.flatnonzero(unc),
        negatives=np.flatnonzero(neg),
    )


__all__ = [
    "Pools",
    "build_pools",
    "hard_negative_mask",
    "positive_mask",
    "pseudo_labels",
    "spl_ratio",
    "uncertain_negative_mask",
]
