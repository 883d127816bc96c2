"""Evidence for issue 15: survival / multi-class tasks and patient-grouped CV.

Writes ``benchmarks/results/task_endpoints.json`` with

* reference equality: Cox log partial likelihood vs statsmodels ``PHReg.loglike``
  (Breslow and Efron, tied times), the discrete-time NLL vs a hand computation,
  Harrell's c-index vs scikit-survival, Cohen's kappa vs scikit-learn;
* leakage: 40 generated patients with 1-4 slides, 5 repeats x 5 folds;
* survival MNIST-bags (real digits of ``../shared/data/mnist-5k``): hazard rising
  with the number of '9's in the bag, exponential times, ~30% censored; 5-fold CV
  c-index of AB-MIL (NLL, Cox), MHIM(AB-MIL) (NLL) and mean pooling, against the
  oracle c-index of the true counts on the same test folds;
* multi-class MNIST-bags (0, 1, 2+ nines: 3 ordinal classes): macro AUC and
  quadratic kappa of AB-MIL vs mean pooling.

Usage: ``python benchmarks/task_endpoints.py [--shared ../shared] [--epochs 20]``
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tiahnm.config import from_dict
from tiahnm.data.bag import Bag
from tiahnm.data.mnist_bags import read_mnist_csv
from tiahnm.tasks.classification import multiclass_metrics
from tiahnm.tasks.survival import harrell_c_index
from tiahnm.tasks.survival_losses import cox_partial_log_likelihood, discrete_time_nll
from tiahnm.training.cv import run_training
from tiahnm.training.splits import kfold_splits


def reference_checks() -> dict:
    """Max absolute differences against the reference libraries."""
    from sklearn.metrics import cohen_kappa_score
    from sksurv.metrics import concordance_index_censored
    from statsmodels.duration.hazard_regression import PHReg

    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(size=(n, 3))
    time_ = rng.integers(1, 15, size=n).astype(np.float64)  # many tied times
    event = (rng.random(n) < 0.7).astype(np.int64)
    out = {
        "n": n,
        "n_events": int(event.sum()),
        "n_distinct_event_times": len(np.unique(time_[event == 1])),
    }
    for ties in ("breslow", "efron"):
        diffs = []
        for _ in range(20):
            b = rng.normal(size=3)
            ref = PHReg(time_, x, status=event, ties=ties).loglike(b)
            ours = float(
                cox_partial_log_likelihood(
                    torch.tensor(x @ b), torch.tensor(time_), torch.tensor(event), ties
                )
            )
            diffs.append(abs(ours - ref))
        out[f"cox_{ties}_max_abs_diff_vs_statsmodels"] = max(diffs)
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    h = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    hand = (
        (-math.log(1 - h[0, 0]) - math.log(h[0, 1]))
        + -sum(math.log(1 - h[1, k]) for k in range(3))
    ) / 2
    nll = float(discrete_time_nll(logits, torch.tensor([1, 2]), torch.tensor([1, 0])))
    out["nll_abs_diff_vs_hand"] = abs(nll - hand)
    risk = rng.normal(size=n)
    out["c_index_abs_diff_vs_sksurv"] = abs(
        harrell_c_index(time_, event, risk)
        - concordance_index_censored(event.astype(bool), time_, risk)[0]
    )
    y = rng.integers(0, 4, size=n)
    p = rng.dirichlet(np.ones(4), size=n) + 0.5 * np.eye(4)[y]
    p /= p.sum(1, keepdims=True)
    for ordinal in (False, True):
        ours = multiclass_metrics(y, p, ordinal=ordinal)["kappa"]
        ref = cohen_kappa_score(
            y, p.argmax(1), weights="quadratic" if ordinal else None
        )
        out[f"kappa_{'quadratic' if ordinal else 'unweighted'}_abs_diff_vs_sklearn"] = (
            abs(ours - ref)
        )
    return out


def leakage_check() -> dict:
    """40 patients, 1-4 slides each, 5 x 5 folds: patients shared between parts."""
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for p in range(40):
        for _ in range(int(rng.integers(1, 5))):
            labels.append(p % 2)
            groups.append(f"P{p:02d}")
    folds = kfold_splits(
        labels, folds=5, repeats=5, val_fraction=0.2, seed=0, groups=groups
    )
    shared = 0
    for f in folds:
        parts = [{groups[i] for i in idx} for idx in (f.train, f.val, f.test)]
        shared += (
            len(parts[0] & parts[1])
            + len(parts[0] & parts[2])
            + len(parts[1] & parts[2])
        )
    return {
        "n_patients": 40,
        "n_slides": len(labels),
        "n_folds": len(folds),
        "patients_shared_between_parts": shared,
    }


def mnist_bags(
    shared: Path, n_bags: int, seed: int, kind: str
) -> tuple[list[Bag], np.ndarray]:
    """Bags of real digits with 0-3 '9's; survival times or count classes."""
    images, digits = read_mnist_csv(shared / "data" / "mnist-5k" / "mnist_5k.csv.gz")
    rng = np.random.default_rng(seed)
    nines, others = np.flatnonzero(digits == 9), np.flatnonzero(digits != 9)
    counts = rng.integers(0, 4, size=n_bags)
    rate = 0.1 * np.exp(0.8 * counts)
    t_event = rng.exponential(1 / rate)
    t_cens = rng.exponential(1 / (0.1 * 0.9), size=n_bags)  # ~30% censored
    bags = []
    for i in range(n_bags):
        size = int(rng.integers(8, 13))
        idx = rng.choice(others, size=size, replace=False)
        idx[: counts[i]] = rng.choice(nines, size=counts[i], replace=False)
        idx = idx[rng.permutation(size)]
        feats = torch.from_numpy(images[idx].astype(np.float32) / 255.0)
        event = int(t_event[i] <= t_cens[i])
        label = event if kind == "survival" else int(min(counts[i], 2))
        bags.append(
            Bag(
                f"b{i:04d}",
                label,
                feats,
                instance_labels=(digits[idx] == 9).astype(np.int64),
                time=float(min(t_event[i], t_cens[i])),
                event=event,
            )
        )
    return bags, counts


def run_cv(
    bags,
    counts,
    tmp: Path,
    name: str,
    head: str,
    task: dict,
    args,
    miner: str = "none",
    batch: int = 1,
) -> dict:
    cfg = from_dict(
        {
            "output_dir": str(tmp / name),
            "seed": 0,
            "task": task,
            "head": {"name": head, "options": {"embed_dim": 64}},
            "miner": {"name": miner},
            "train": {
                "epochs": args.epochs,
                "lr": 5e-4,
                "progress": False,
                "num_threads": 1,
                "batch_size": batch,
                "patience": args.epochs,
                "monitor": "val_loss",
            },
            "cv": {"folds": 5, "val_fraction": 0.15},
            "evaluation": {"bootstrap": 200, "report": False},
        }
    )
    t0 = time.perf_counter()
    summary = run_training(cfg, bags=bags)
    out = {
        "seconds": time.perf_counter() - t0,
        "metrics": {
            k: v
            for k, v in summary["metrics"].items()
            if k
            in (
                "c_index",
                "auc",
                "kappa",
                "accuracy",
                "balanced_accuracy",
                "f1",
                "logrank_p",
            )
        },
    }
    if (
        task["name"] == "survival"
    ):  # oracle c-index of the true counts on the same test folds
        oracle = []
        for fold_dir in sorted((tmp / name / "folds").iterdir()):
            res = json.loads((fold_dir / "result.json").read_text())
            ids = [int(p["slide_id"][1:]) for p in res["predictions"]]
            t = np.asarray([bags[i].time for i in ids])
            e = np.asarray([bags[i].event for i in ids])
            oracle.append(harrell_c_index(t, e, counts[ids].astype(float)))
        out["oracle_c_index_same_folds"] = {
            "mean": float(np.mean(oracle)),
            "std": float(np.std(oracle, ddof=1)),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=Path("../shared"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-bags", type=int, default=250)
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/task_endpoints.json")
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {
        "argv": sys.argv,
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hardware": f"{platform.machine()} CPU, 1 torch thread",
        "reference": reference_checks(),
        "leakage": leakage_check(),
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bags, counts = mnist_bags(args.shared, args.n_bags, 0, "survival")
        surv = {
            "n_bags": len(bags),
            "censored_fraction": float(np.mean([1 - b.event for b in bags])),
        }
        runs = {
            "abmil_nll": (
                "abmil",
                {"name": "survival", "options": {"loss": "nll"}},
                "none",
                1,
            ),
            "abmil_cox": (
                "abmil",
                {"name": "survival", "options": {"loss": "cox", "ties": "efron"}},
                "none",
                16,
            ),
            "mhim_abmil_nll": (
                "abmil",
                {"name": "survival", "options": {"loss": "nll"}},
                "mhim",
                1,
            ),
            "mean_pool_nll": (
                "mean_pool",
                {"name": "survival", "options": {"loss": "nll"}},
                "none",
                1,
            ),
        }
        for key, (head, task, miner, batch) in runs.items():
            surv[key] = run_cv(bags, counts, tmp, key, head, task, args, miner, batch)
            print(key, surv[key]["metrics"]["c_index"], flush=True)
        result["survival_mnist"] = surv
        bags, counts = mnist_bags(args.shared, args.n_bags, 1, "multiclass")
        multi = {
            "n_bags": len(bags),
            "classes": "0, 1, 2+ nines (ordinal)",
            "class_counts": np.bincount([b.label for b in bags]).tolist(),
        }
        for key, head in (("abmil", "abmil"), ("mean_pool", "mean_pool")):
            multi[key] = run_cv(
                bags,
                counts,
                tmp,
                "mc_" + key,
                head,
                {"name": "multiclass", "options": {"ordinal": True}},
                args,
            )
            print(key, multi[key]["metrics"]["auc"], flush=True)
        result["multiclass_mnist"] = multi
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["reference"], indent=2))
    print(json.dumps(result["leakage"], indent=2))


if __name__ == "__main__":
    main()
