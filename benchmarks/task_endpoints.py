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

Recipes (epochs, lr, alpha, batch, monitor; :data:`GRIDS`) are chosen per model on a
separate development cohort (other random bags, never reported), kept in
``benchmarks/results/task_recipe_sweep.json`` (runs already there are reused); the
evaluation cohorts are then run once per model with its chosen recipe. ``--models``
runs a subset (several processes) and ``--merge`` joins their output files.

Usage: ``python benchmarks/task_endpoints.py [--shared ../shared] [--n-bags 200]``
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
from tiahnm.crossval import run_training
from tiahnm.data.bag import Bag
from tiahnm.data.mnist_bags import read_mnist_csv
from tiahnm.tasks.classification import multiclass_metrics
from tiahnm.tasks.survival import harrell_c_index
from tiahnm.tasks.survival_losses import cox_partial_log_likelihood, discrete_time_nll
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


#: Exponential censoring rate giving 30% censored bags in expectation.
CENSOR_RATE = 0.1218


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
    # censoring rate 0.1218: E[rate_c / (rate_c + rate_event)] = 0.30 over counts 0-3
    t_cens = rng.exponential(1 / CENSOR_RATE, size=n_bags)
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


#: The recipe of the first run (issue-15 commit 13cd070), before any choice.
BASE_RECIPE = {"epochs": 12, "lr": 5e-4, "monitor": "val_loss", "batch": 1}


def run_cv(
    bags,
    counts,
    tmp: Path,
    name: str,
    head: str,
    task: dict,
    recipe: dict,
    miner: str = "none",
) -> dict:
    """5-fold CV of ``head`` under ``recipe`` (epochs, lr, monitor, batch)."""
    r = BASE_RECIPE | recipe
    cfg = from_dict(
        {
            "output_dir": str(tmp / name),
            "seed": 0,
            "task": task,
            "head": {"name": head, "options": {"embed_dim": 64}},
            "miner": {"name": miner},
            "train": {
                "epochs": r["epochs"],
                "lr": r["lr"],
                "progress": False,
                "num_threads": 1,
                "batch_size": r["batch"],
                "patience": r["epochs"],
                "monitor": r["monitor"],
            },
            "cv": {"folds": 5, "val_fraction": 0.15},
            "evaluation": {"bootstrap": 200, "report": False},
        }
    )
    t0 = time.perf_counter()
    summary = run_training(cfg, bags=bags)
    out = {
        "recipe": r,
        "task": task,
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


#: Models: (head, task, miner, grid). MHIM(AB-MIL) takes AB-MIL NLL's choice.
SURVIVAL_MODELS = {
    "abmil_nll": ("abmil", {"loss": "nll"}, "none", "nll"),
    "abmil_cox": ("abmil", {"loss": "cox", "ties": "efron"}, "none", "cox"),
    "mhim_abmil_nll": ("abmil", {"loss": "nll"}, "mhim", "abmil_nll"),
    "mean_pool_nll": ("mean_pool", {"loss": "nll"}, "none", "nll"),
    "mean_pool_cox": ("mean_pool", {"loss": "cox", "ties": "efron"}, "none", "cox"),
}
MULTICLASS_MODELS = ("abmil", "mean_pool")

#: Recipes tried on the development cohort: (name, recipe, task option overrides).
GRIDS = {
    "nll": [
        ("base", {}, {}),
        ("e30", {"epochs": 30}, {}),
        ("e30_alpha0.4", {"epochs": 30}, {"alpha": 0.4}),
        ("e30_batch16", {"epochs": 30, "batch": 16}, {}),
        ("e30_monitor_c", {"epochs": 30, "monitor": "val_c_index"}, {}),
        ("e30_lr2e-3", {"epochs": 30, "lr": 2e-3}, {}),
    ],
    "cox": [
        ("base_batch16", {"batch": 16}, {}),
        ("e30_batch16", {"epochs": 30, "batch": 16}, {}),
    ],
    "multiclass": [
        ("base", {}, {}),
        ("e30", {"epochs": 30}, {}),
    ],
}


def sweep(args, tmp: Path, done: dict) -> dict:
    """Every recipe of :data:`GRIDS` on a development cohort (seeds 100 / 101).

    The development cohort is generated like the evaluation cohort but from other
    random draws; its 5-fold c-index / macro AUC only chooses recipes and is never
    reported as a result. Runs already in ``done`` (a previous sweep file) are kept;
    the file is rewritten after each new run.
    """
    out: dict = {"survival": {}, "multiclass": {}} | done
    only = set(args.only_grid.split(",")) if args.only_grid else None

    def save() -> None:
        from tiahnm.utils.provenance import write_result

        write_result(
            args.sweep_json, {k: v for k, v in out.items() if k != "provenance"}
        )

    bags, counts = mnist_bags(args.shared, args.n_bags, 100, "survival")
    for key, (head, task_opts, miner, grid) in SURVIVAL_MODELS.items():
        for name, recipe, extra in GRIDS.get(grid, []):
            if name in out["survival"].get(key, {}) or (only and name not in only):
                continue
            task = {"name": "survival", "options": task_opts | extra}
            res = run_cv(
                bags, counts, tmp, f"dev_{key}_{name}", head, task, recipe, miner
            )
            out["survival"].setdefault(key, {})[name] = res
            save()
            print("dev", key, name, res["metrics"]["c_index"]["mean"], flush=True)
    bags, counts = mnist_bags(args.shared, args.n_bags, 101, "multiclass")
    for head in MULTICLASS_MODELS:
        for name, recipe, extra in GRIDS["multiclass"]:
            if name in out["multiclass"].get(head, {}) or (only and name not in only):
                continue
            task = {"name": "multiclass", "options": {"ordinal": True} | extra}
            res = run_cv(bags, counts, tmp, f"dev_mc_{head}_{name}", head, task, recipe)
            out["multiclass"].setdefault(head, {})[name] = res
            save()
            print("dev mc", head, name, res["metrics"]["auc"]["mean"], flush=True)
    return out


def chosen(dev: dict, kind: str, key: str, metric: str) -> tuple[str, dict, dict]:
    """The recipe with the best development-cohort mean ``metric``."""
    grid = "multiclass" if kind == "multiclass" else SURVIVAL_MODELS[key][3]
    runs = dev[kind][key]
    best = max(runs, key=lambda n: runs[n]["metrics"][metric]["mean"])
    name, recipe, extra = next(g for g in GRIDS[grid] if g[0] == best)
    return name, recipe, extra


def evaluate(args, tmp: Path, dev: dict) -> tuple[dict, dict]:
    """Each model once on the evaluation cohorts (seeds 0 / 1) with its chosen recipe.

    ``args.models`` (comma-separated keys; ``mc_<head>`` for multi-class) restricts
    the models run (to run them in several processes and ``--merge`` the files).
    """
    wanted = set(args.models.split(",")) if args.models else None
    bags, counts = mnist_bags(args.shared, args.n_bags, 0, "survival")
    surv: dict = {
        "n_bags": len(bags),
        "censored_fraction": float(np.mean([1 - b.event for b in bags])),
    }
    for key, (head, task_opts, miner, grid) in SURVIVAL_MODELS.items():
        if wanted and key not in wanted:
            continue
        source = grid if grid not in GRIDS else key
        name, recipe, extra = chosen(dev, "survival", source, "c_index")
        task = {"name": "survival", "options": task_opts | extra}
        res = run_cv(bags, counts, tmp, key, head, task, recipe, miner)
        surv[key] = res | {"recipe_name": name}
        print(key, name, res["metrics"]["c_index"], flush=True)
    bags, counts = mnist_bags(args.shared, args.n_bags, 1, "multiclass")
    multi: dict = {
        "n_bags": len(bags),
        "classes": "0, 1, 2+ nines (ordinal)",
        "class_counts": np.bincount([b.label for b in bags]).tolist(),
    }
    for head in MULTICLASS_MODELS:
        if wanted and f"mc_{head}" not in wanted:
            continue
        name, recipe, extra = chosen(dev, "multiclass", head, "auc")
        task = {"name": "multiclass", "options": {"ordinal": True} | extra}
        res = run_cv(bags, counts, tmp, "mc_" + head, head, task, recipe)
        multi[head] = res | {"recipe_name": name}
        print(head, name, res["metrics"]["auc"], flush=True)
    return surv, multi


def merge(paths: list[Path], out: Path) -> None:
    """One result file from per-process files (models and cohort facts united)."""
    merged: dict = {"merged_from": [str(p) for p in paths], "parts": []}
    for path in paths:
        part = json.loads(path.read_text())
        stamp = part.get("provenance", {})
        merged["parts"].append(
            {k: part.get(k, stamp.get(k)) for k in ("argv", "commit")}
        )
        for key, value in part.items():
            if key == "provenance":
                continue
            if key in ("survival_mnist", "multiclass_mnist"):
                merged.setdefault(key, {}).update(value)
            elif key not in merged:
                merged[key] = value
    from tiahnm.utils.provenance import write_result

    write_result(out, merged)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=Path("../shared"))
    p.add_argument("--n-bags", type=int, default=200)
    p.add_argument(
        "--sweep-json",
        type=Path,
        default=Path("benchmarks/results/task_recipe_sweep.json"),
        help="Development-cohort sweep: its runs are reused, missing ones run.",
    )
    p.add_argument("--sweep-only", action="store_true", help="Stop after the sweep.")
    p.add_argument("--no-sweep", action="store_true", help="Use the sweep file as is.")
    p.add_argument("--models", default=None, help="Evaluate only these models.")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="Merge the model results of these output files into --out and stop.",
    )
    p.add_argument(
        "--only-grid",
        default=None,
        help="Sweep only these recipe names (comma-separated; others skipped).",
    )
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/task_endpoints.json")
    )
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    torch.set_num_threads(1)
    meta = {
        "argv": sys.argv,
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hardware": f"{platform.machine()} CPU, 1 torch thread",
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        done = {}
        if args.sweep_json.is_file():
            done = json.loads(args.sweep_json.read_text())
        dev = meta | done if args.no_sweep else sweep(args, tmp, meta | done)
        if args.sweep_only:
            return
        result = meta | {
            "reference": reference_checks(),
            "leakage": leakage_check(),
            "recipes_from": str(args.sweep_json),
        }
        result["survival_mnist"], result["multiclass_mnist"] = evaluate(args, tmp, dev)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from tiahnm.utils.provenance import write_result

    write_result(args.out, result)
    print(json.dumps(result["reference"], indent=2))
    print(json.dumps(result["leakage"], indent=2))


if __name__ == "__main__":
    main()
