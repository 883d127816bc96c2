"""Survival losses and task metrics against reference libraries and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiahnm.tasks.classification import multiclass_metrics
from tiahnm.tasks.survival import SurvivalTask, harrell_c_index
from tiahnm.tasks.survival_losses import (
    assign_bins,
    cox_partial_log_likelihood,
    discrete_time_nll,
    quantile_bins,
)


def tied_cohort(n: int = 60, seed: int = 0):
    """Integer times (many ties), ~30% censored, two covariates."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    time = rng.integers(1, 9, size=n).astype(np.float64)
    event = (rng.random(n) < 0.7).astype(np.int64)
    return x, time, event


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_log_partial_likelihood_equals_statsmodels(ties: str) -> None:
    from statsmodels.duration.hazard_regression import PHReg

    x, time, event = tied_cohort()
    assert len(np.unique(time[event == 1])) < event.sum()  # ties among events
    for beta in ([0.0, 0.0], [0.4, -0.8], [1.5, 0.3]):
        b = np.asarray(beta)
        ref = PHReg(time, x, status=event, ties=ties).loglike(b)
        ours = cox_partial_log_likelihood(
            torch.tensor(x @ b), torch.tensor(time), torch.tensor(event), ties
        )
        assert abs(float(ours) - ref) < 1e-6


def test_efron_differs_from_breslow_only_with_ties() -> None:
    x, time, event = tied_cohort()
    risk = torch.tensor(x @ np.array([0.5, -0.2]))
    args = (torch.tensor(time), torch.tensor(event))
    assert float(cox_partial_log_likelihood(risk, *args, "efron")) > float(
        cox_partial_log_likelihood(risk, *args, "breslow")
    )
    distinct = torch.tensor(time + np.arange(len(time)) * 1e-3)
    a = cox_partial_log_likelihood(risk, distinct, args[1], "efron")
    b = cox_partial_log_likelihood(risk, distinct, args[1], "breslow")
    assert abs(float(a) - float(b)) < 1e-12


def test_cox_gradient_flows_and_no_event_is_zero() -> None:
    risk = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ll = cox_partial_log_likelihood(
        risk, torch.arange(6.0), torch.tensor([1, 0, 1, 1, 0, 0]), "efron"
    )
    ll.backward()
    assert risk.grad is not None and risk.grad.abs().sum() > 0
    zero = cox_partial_log_likelihood(
        risk, torch.arange(6.0), torch.zeros(6), "breslow"
    )
    assert float(zero) == 0.0


def test_discrete_nll_equals_hand_computed_value() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    bins = torch.tensor([1, 2])
    event = torch.tensor([1, 0])
    h = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    # bag 0, event in bin 1: -log(1 - h00) - log(h01)
    l0 = -math.log(1 - h[0, 0]) - math.log(h[0, 1])
    # bag 1, censored in bin 2: -log S_2 = -sum_{k<=2} log(1 - h1k)
    l1 = -sum(math.log(1 - h[1, k]) for k in range(3))
    expected = (l0 + l1) / 2
    assert abs(float(discrete_time_nll(logits, bins, event)) - expected) < 1e-6
    # alpha puts extra weight on the uncensored term: (1-a)*(l0+l1)/2 + a*l0/2
    a = 0.4
    got = float(discrete_time_nll(logits, bins, event, alpha=a))
    assert abs(got - ((1 - a) * expected + a * l0 / 2)) < 1e-6


def test_bins_from_uncensored_training_times() -> None:
    times = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])
    events = np.array([1, 1, 1, 1, 1, 0])  # the censored 100 does not move the edges
    edges = quantile_bins(times, events, 4)
    assert np.allclose(edges, [2.0, 3.0, 4.0])
    assert assign_bins(np.array([0.5, 2.0, 3.9, 4.0, 1e6]), edges).tolist() == [
        0,
        1,
        2,
        3,
        3,
    ]


def test_c_index_equals_scikit_survival_and_pair_count() -> None:
    from sksurv.metrics import concordance_index_censored

    _, time, event = tied_cohort(seed=3)
    risk = np.random.default_rng(1).normal(size=len(time))
    ref = concordance_index_censored(event.astype(bool), time, risk)[0]
    assert harrell_c_index(time, event, risk) == ref
    # brute force Harrell: pairs (i, j) with event_i and t_i < t_j, or t_i == t_j
    # with j censored (scikit-survival's rule for tied times)
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            later = time[i] < time[j] or (time[i] == time[j] and not event[j])
            if event[i] and later and i != j:
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    assert abs(ref - num / den) < 1e-12


def test_survival_task_metrics_use_the_risk_column() -> None:
    task = SurvivalTask(loss="cox")
    _, time, event = tied_cohort(seed=4)
    risk = -time + np.random.default_rng(0).normal(scale=0.1, size=len(time))
    bags = [
        type("B", (), {"time": t, "event": e, "slide_id": str(i)})()
        for i, (t, e) in enumerate(zip(time, event, strict=True))
    ]
    outputs = np.stack([risk, np.zeros_like(risk), risk], axis=1)
    m = task.metrics(bags, outputs, threshold=float(np.median(risk)))
    assert m["c_index"] > 0.9
    assert m["logrank_p"] < 0.05


@pytest.mark.parametrize("ordinal", [False, True])
def test_kappa_equals_scikit_learn(ordinal: bool) -> None:
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=80)
    logits = rng.normal(size=(80, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass_metrics(y, probs, ordinal=ordinal)
    ref = cohen_kappa_score(
        y, probs.argmax(1), weights="quadratic" if ordinal else None
    )
    assert m["kappa"] == pytest.approx(ref, abs=1e-12)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert m["auc_class2"] == pytest.approx(roc_auc_score(y == 2, probs[:, 2]))
    assert set(m) >= {"accuracy", "balanced_accuracy", "f1", "recall_class0"}


def test_macro_auc_is_nan_when_a_class_is_absent() -> None:
    probs = np.full((4, 3), 1 / 3)
    m = multiclass_metrics([0, 1, 0, 1], probs)
    assert math.isnan(m["auc"])
    assert math.isnan(m["recall_class2"])
