"""Survival losses: Cox partial likelihood (Breslow / Efron ties) and discrete-time NLL.

Both take the head's bag logits; nothing here knows about heads or bags.

* :func:`cox_partial_log_likelihood`: the log partial likelihood of risk scores
  ``eta`` over a set of bags (the risk sets are formed inside the set, so the loss
  needs several bags per step: a multi-bag batch).
* :func:`discrete_time_nll`: the negative log-likelihood of a discrete-time hazard
  model over ``K`` time bins, as in Patch-GCN / MCAT and the MHIM-MIL v2 survival
  code (``hazards = sigmoid(logits)``, ``S = cumprod(1 - hazards)``).
* :func:`quantile_bins`: the bin edges from the uncensored times of the training fold.
"""

from __future__ import annotations

import numpy as np
import torch

TIES = ("breslow", "efron")


def cox_partial_log_likelihood(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    ties: str = "breslow",
) -> torch.Tensor:
    """Log partial likelihood of a Cox model at risk scores ``risk``.

    For each distinct event time ``t`` with the set ``D`` of ``d`` events and the risk
    set ``R = {j: t_j >= t}``:

    * Breslow: ``sum_D eta - d * log(sum_R exp(eta))``;
    * Efron: ``sum_D eta - sum_{l<d} log(sum_R exp(eta) - l/d * sum_D exp(eta))``.

    Args:
        risk (torch.Tensor): ``[B]`` risk scores (linear predictors).
        time (torch.Tensor): ``[B]`` follow-up times.
        event (torch.Tensor): ``[B]`` 1 for an event, 0 for censored.
        ties (str): ``breslow`` or ``efron``.

    Returns:
        torch.Tensor: The log partial likelihood (a scalar; 0 without events).
    """
    if ties not in TIES:
        msg = f"ties must be one of {', '.join(TIES)}, got {ties!r}."
        raise ValueError(msg)
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.device)
    event = event.reshape(-1).to(risk.device).bool()
    if not bool(event.any()):
        return risk.sum() * 0.0
    ev_times = torch.unique(time[event])  # [T]
    at_risk = (time[None, :] >= ev_times[:, None]).to(risk.dtype)  # [T, B]
    in_d = ((time[None, :] == ev_times[:, None]) & event[None, :]).to(risk.dtype)
    d = in_d.sum(1)  # [T]
    shift = risk.detach().max()
    e = torch.exp(risk - shift)
    s_r = at_risk @ e  # [T]
    eta_d = in_d @ risk
    if ties == "breslow":
        return (eta_d - d * (torch.log(s_r) + shift)).sum()
    s_d = in_d @ e
    steps = torch.arange(int(d.max()), device=risk.device, dtype=risk.dtype)  # [L]
    frac = steps[None, :] / d[:, None]  # [T, L]
    valid = steps[None, :] < d[:, None]
    inner = (s_r[:, None] - frac * s_d[:, None]).clamp_min(torch.finfo(e.dtype).tiny)
    logs = torch.where(valid, torch.log(inner) + shift, torch.zeros_like(inner))
    return (eta_d - logs.sum(1)).sum()


def cox_loss(
    risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str = "breslow"
) -> torch.Tensor:
    """Negative log partial likelihood divided by the number of events (0 without)."""
    n_events = event.reshape(-1).bool().sum().clamp_min(1)
    return -cox_partial_log_likelihood(risk, time, event, ties) / n_events


def discrete_time_nll(
    logits: torch.Tensor,
    bins: torch.Tensor,
    event: torch.Tensor,
    *,
    alpha: float = 0.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Mean discrete-time survival NLL over bags (Zadeh & Schmid 2020 form).

    With ``h = sigmoid(logits)``, ``S_k = prod_{j<=k} (1 - h_j)`` and ``S_{-1} = 1``:
    an event in bin ``y`` contributes ``-log S_{y-1} - log h_y``, a censored bag in
    bin ``y`` contributes ``-log S_y``; the loss is
    ``(1 - alpha) * (censored + uncensored) + alpha * uncensored``, averaged.

    Args:
        logits (torch.Tensor): ``[B, K]`` bag logits, one per time bin.
        bins (torch.Tensor): ``[B]`` long bin index of each bag's time.
        event (torch.Tensor): ``[B]`` 1 for an event, 0 for censored.
        alpha (float): Extra weight of the uncensored term (0: the plain NLL).
        eps (float): Clamp of the probabilities before the log.

    Returns:
        torch.Tensor: Scalar loss.
    """
    hazards = torch.sigmoid(logits.float())
    surv = torch.cumprod(1.0 - hazards, dim=1)
    y = bins.reshape(-1, 1).long().to(logits.device)
    c = 1.0 - event.reshape(-1, 1).float().to(logits.device)  # censored = 1
    s_pad = torch.cat([torch.ones_like(c), surv], dim=1)
    s_before = torch.gather(s_pad, 1, y).clamp_min(eps)
    h_at = torch.gather(hazards, 1, y).clamp_min(eps)
    s_at = torch.gather(s_pad, 1, y + 1).clamp_min(eps)
    uncensored = -(1.0 - c) * (torch.log(s_before) + torch.log(h_at))
    censored = -c * torch.log(s_at)
    loss = (1.0 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def discrete_risk(logits: np.ndarray) -> np.ndarray:
    """Risk of a discrete-time model: minus the sum of the survival curve ``S``.

    Args:
        logits (np.ndarray): ``[n, K]`` logits (``sigmoid`` gives the hazards).
    """
    hazards = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    return -np.cumprod(1.0 - hazards, axis=1).sum(axis=1)


def quantile_bins(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """Interior bin edges ``[n_bins - 1]``: quantiles of the uncensored ``times``.

    A time ``t`` falls in bin ``searchsorted(edges, t, side="right")`` (intervals
    closed on the left, as ``pd.cut(right=False)`` in Patch-GCN); times outside the
    training range fall in the first or last bin.
    """
    t = np.asarray(times, dtype=np.float64)[np.asarray(events).astype(bool)]
    if t.size == 0:
        msg = "no uncensored times to form the survival bins from."
        raise ValueError(msg)
    return np.quantile(t, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])


def assign_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time for the interior ``edges`` of :func:`quantile_bins`."""
    return np.searchsorted(edges, np.asarray(times, dtype=np.float64), side="right")


__all__ = [
    "TIES",
    "assign_bins",
    "cox_loss",
    "cox_partial_log_likelihood",
    "discrete_risk",
    "discrete_time_nll",
    "quantile_bins",
]
