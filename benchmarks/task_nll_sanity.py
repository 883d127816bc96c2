"""Is the discrete-time NLL sound? Fit it on the true hazard covariate.

The survival MNIST-bags times come from ``rate = 0.1 * exp(0.8 * count)`` with 30%
exponential censoring (:mod:`benchmarks.task_endpoints`). Here the model sees the
true ``count`` of each bag as its only feature: a linear NLL model (one shared
coefficient, or one per time bin), and a linear Cox model, are fitted by Adam on
300 subjects and scored on 100 held-out ones; each should reach the oracle c-index
(the count itself) if the loss and the risk ``-sum(S)`` are right. Writes
``benchmarks/results/task_nll_sanity.json``.

Usage: ``python benchmarks/task_nll_sanity.py``
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tiahnm.tasks.survival import harrell_c_index
from tiahnm.tasks.survival_losses import (
    assign_bins,
    cox_loss,
    discrete_time_nll,
    quantile_bins,
)

CENSOR_RATE = 0.1218  # as benchmarks/task_endpoints.py


def fit_and_score(kind: str, x, t, e, bins, train, test) -> tuple[float, list]:
    """Held-out c-index of a linear model of ``x`` trained with ``kind``."""
    torch.manual_seed(0)
    k = 1 if kind == "cox" else 4
    w = torch.zeros(1, k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    ev = torch.as_tensor(e)

    def logits(idx):
        weight = w[:, :1].expand(1, k) if kind == "nll_shared" else w
        return x[idx] @ weight + b

    for _ in range(500):
        out = logits(train)
        if kind == "cox":
            loss = cox_loss(out[:, 0].double(), torch.tensor(t[train]), ev[train])
        else:
            loss = discrete_time_nll(out, bins[train], ev[train])
        opt.zero_grad()
        loss.float().backward()
        opt.step()
    with torch.no_grad():
        out = logits(test)
        if kind == "cox":
            risk = out[:, 0].numpy()
        else:
            risk = -torch.cumprod(1 - torch.sigmoid(out), 1).sum(1).numpy()
    return harrell_c_index(t[test], e[test], risk), w.detach().numpy().tolist()


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n = 400
    counts = rng.integers(0, 4, size=n)
    t_event = rng.exponential(1 / (0.1 * np.exp(0.8 * counts)))
    t_cens = rng.exponential(1 / CENSOR_RATE, size=n)
    t = np.minimum(t_event, t_cens)
    e = (t_event <= t_cens).astype(np.int64)
    train, test = np.arange(300), np.arange(300, 400)
    x = torch.tensor(counts, dtype=torch.float32)[:, None]
    bins = torch.as_tensor(assign_bins(t, quantile_bins(t[train], e[train], 4)))
    result = {
        "argv": sys.argv,
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "censored_fraction": float(1 - e.mean()),
        "oracle_test_c_index": harrell_c_index(t[test], e[test], counts[test]),
    }
    for kind in ("nll_shared", "nll_per_bin", "cox"):
        c, w = fit_and_score(kind, x, t, e, bins, train, test)
        result[kind] = {"test_c_index": c, "coefficients": w}
    out = Path("benchmarks/results/task_nll_sanity.json")
    from tiahnm.utils.provenance import write_result

    write_result(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
