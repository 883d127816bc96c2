"""Hard-instance mining on identical folds: plain vs MHIM vs Li 2019 (issue 18).

Two studies, every variant on the same splits and seeds (``splits.csv`` is checked
to be identical), epochs and thresholds chosen on a validation part of each training
fold only:

``mhim``: on UCSB (58 breast TMA images, 32 px patches embedded once by a frozen,
seeded random ``small_cnn``, as ``li2019_ucsb.py``; bag labels only) and on
MNIST-bags (pixels, target digit 9; instance labels, so instance AUC), variants

* ``plain``: the gated-attention head (``abmil_gated``), no miner;
* ``mhim_nowarm``: ``mhim`` with the teacher a copy of the untrained student
  (``teacher_warmup: 0``, the behaviour before issue 18);
* ``mhim``: ``mhim`` out of the box (no ``teacher_init``: 20% of the epochs of plain
  warm-up, then the teacher starts from the student);
* ``mhim_init``: ``mhim`` with ``teacher_init`` = the same fold's ``plain`` model;
* ``li2019``: FMB hard-negative bags, ``rounds: 2``, the kept model the best on
  validation over both rounds.

``li2019``: MNIST-bags whose bags draw half their instances from the digits 4 and 7,
confusable with the target 9 (hard negatives by construction, ``hard_digits``),
variants ``plain``, ``adaptive`` (eq. 2, lambda 2), ``sb``, ``mb``, ``fmb``
(adaptive + the ``li2019`` miner, 2 rounds) and ``fmb_oof`` (FMB with
``fp_source: out_of_fold``, a departure from the paper): accuracy, false-positive
rate, AUC.

``stability``: end to end (``encoder_mil``: ``small_cnn`` + gated attention on the
28 px digits of MNIST-bags, or on 32 px patches of the real UCSB images with
``--dataset ucsb_images``), the loop defaults with the raw encoder features
(``e2e_plain``, ``feature_norm: none``: the behaviour before issue 18) against
learning-rate warm-up (3 epochs) with gradient clipping (norm 1.0) (``e2e_stable``,
also raw features) and against ``feature_norm: batch`` (``e2e_featnorm``, the
default since issue 18); a fold "collapses" when its best validation epoch is 0-2
or its test AUC is below 0.6.

``e2e_mining``: the mining comparison end to end (the ``e2e_featnorm`` model above
as ``plain``), on identical folds: ``e2e_mhim`` (``mhim`` out of the box),
``e2e_mhim_init`` (``teacher_init`` = the same fold's ``e2e_featnorm`` model) and
``e2e_li2019`` (FMB, 2 rounds, selection over rounds on validation).

Per variant the JSON holds per-fold bag AUC, accuracy, FPR, instance AUC, best epoch
and best round, the mean and std over folds, and the Wilcoxon signed-rank p-value
(scipy, two-sided) of the per-fold differences against ``plain``.

Usage::

    python benchmarks/hard_mining_compare.py --study mhim --dataset mnist10
    python benchmarks/hard_mining_compare.py --study mhim --dataset ucsb
    python benchmarks/hard_mining_compare.py --study li2019 --dataset mnist_hard
    python benchmarks/hard_mining_compare.py --study stability --dataset mnist10
    python benchmarks/hard_mining_compare.py --study e2e_mining --dataset ucsb_images
    python benchmarks/hard_mining_compare.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDIES = {
    "mhim": ("plain", "mhim_nowarm", "mhim", "mhim_init", "li2019"),
    "li2019": ("plain", "adaptive", "sb", "mb", "fmb", "fmb_oof"),
    "stability": ("e2e_plain", "e2e_stable", "e2e_featnorm"),
    "e2e_mining": ("e2e_featnorm", "e2e_mhim", "e2e_mhim_init", "e2e_li2019"),
}
FOLD_KEYS = ("auc", "accuracy", "fpr", "instance_auc")
_RAW_FEATURES = ("e2e_plain", "e2e_stable")  # feature_norm: none (before issue 18)


def mnist_options(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """``mnist_bags`` options of a dataset name."""
    size = 50 if dataset == "mnist50" else 10
    opts: dict[str, Any] = {
        "path": str(args.data_dir / "mnist-5k" / "mnist_5k.csv.gz"),
        "target": 9,
        "n_bags": args.n_bags,
        "mean_bag_size": size,
        "std_bag_size": size / 5,
        "seed": args.seed,
    }
    if dataset == "mnist_hard":
        opts.update(hard_digits=[4, 7], hard_fraction=0.5)
    return opts


def data_section(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """The ``data`` section (UCSB bags are passed in, features precomputed)."""
    if dataset == "ucsb_images":  # the real images, end to end
        root = str(args.data_dir / "ucsb-breast-tma")
        opts = {"root": root, "image_column": "image", "label_column": "malignant"}
        return {"source": "image_patches", "options": {**opts, "patch_size": 32}}
    if dataset == "ucsb":
        root = str(args.data_dir / "ucsb-breast-tma")
        return {
            "source": "image_patches",
            "options": {"root": root},
            "standardize": True,
        }
    return {"source": "mnist_bags", "options": mnist_options(args, dataset)}


def miner_for(variant: str, run_root: Path) -> tuple[dict[str, Any], int, bool]:
    """(miner section, rounds, adaptive weighting) of a variant."""
    if variant in ("e2e_mhim", "e2e_li2019"):
        return miner_for(variant[len("e2e_") :], run_root)
    if variant == "e2e_mhim_init":  # teacher: the same fold's end-to-end plain model
        init = str(run_root / "e2e_featnorm/folds/{fold_name}/best.pt")
        return {"name": "mhim", "options": {"teacher_init": init}}, 1, False
    if variant.startswith("mhim"):
        options: dict[str, Any] = {}
        if variant == "mhim_nowarm":
            options["teacher_warmup"] = 0
        if variant == "mhim_init":
            options["teacher_init"] = str(run_root / "plain/folds/{fold_name}/best.pt")
        return {"name": "mhim", "options": options}, 1, False
    if variant == "li2019":
        return {"name": "li2019", "options": {"mode": "fmb", "n_bags": 10}}, 2, False
    if variant in ("sb", "mb", "fmb"):
        return {"name": "li2019", "options": {"mode": variant, "n_bags": 10}}, 2, True
    if variant == "fmb_oof":  # false positives found out of fold: not the paper
        options = {"mode": "fmb", "n_bags": 10, "fp_source": "out_of_fold"}
        return {"name": "li2019", "options": options}, 2, True
    return {"name": "none", "options": {}}, 1, variant == "adaptive"


def config_for(
    variant: str, dataset: str, args: argparse.Namespace, run_root: Path
) -> dict[str, Any]:
    """The run config of one variant."""
    miner, rounds, adaptive = miner_for(variant, run_root)
    head_options: dict[str, Any] = {"embed_dim": 128, "attn_dim": 64, "dropout": 0.0}
    if adaptive:
        head_options["adaptive_lambda"] = 2.0
    head = {"name": "abmil_gated", "options": head_options}
    extra: dict[str, Any] = {}
    if variant.startswith("e2e"):
        shape = [3, 32, 32] if dataset == "ucsb_images" else [1, 28, 28]
        head = {
            "name": "encoder_mil",
            "options": {
                "image_shape": shape,
                "encoder": "small_cnn",
                "encoder_options": {"out_dim": 64, "width": 16},
                "head": "abmil_gated",
                "head_options": {"embed_dim": 64, "attn_dim": 32, "dropout": 0.0},
                # feature_norm batch: the default since issue 18 (BatchNorm1d)
                "feature_norm": "none" if variant in _RAW_FEATURES else "batch",
            },
        }
        if variant == "e2e_stable":
            extra = {"warmup_epochs": 3, "grad_clip": 1.0}
    return {
        "output_dir": str(run_root / variant),
        "seed": args.seed,
        "data": data_section(args, dataset),
        "head": head,
        "miner": miner,
        "train": {
            "epochs": args.epochs,
            "rounds": rounds,
            "lr": 5e-4,
            "weight_decay": 1e-4,
            "scheduler": "cosine",
            "monitor": "val_loss",
            "patience": 15,
            "num_threads": 1,
            "progress": False,
            **extra,
        },
        "cv": {"folds": args.folds, "repeats": args.repeats, "val_fraction": 0.2},
        "evaluation": {"bootstrap": 0, "report": False},
    }


def load_bags(args: argparse.Namespace, dataset: str) -> list | None:
    """UCSB bags with frozen random-CNN features (``li2019_ucsb.py``), else None."""
    if dataset != "ucsb":
        return None
    from li2019_ucsb import load_bags as ucsb_bags

    ns = argparse.Namespace(
        data_dir=args.data_dir,
        work_dir=args.work_dir,
        features="random_cnn",
        seed=0,
    )
    return ucsb_bags(ns)


def run(args: argparse.Namespace) -> None:
    """Train every variant of the study on the dataset (finished runs are kept)."""
    from tiahnm.config import from_dict
    from tiahnm.crossval import run_training

    torch.set_num_threads(1)
    bags = load_bags(args, args.dataset)
    run_root = args.work_dir / args.study / args.dataset
    for variant in args.variants or STUDIES[args.study]:
        t0 = time.perf_counter()
        cfg = from_dict(config_for(variant, args.dataset, args, run_root))
        if not (Path(cfg.output_dir) / "summary.json").is_file():
            run_training(cfg, bags=bags)
        wall = time.perf_counter() - t0
        (Path(cfg.output_dir) / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
        print(f"{args.study}/{args.dataset}/{variant}: {wall:.0f} s", flush=True)


def fold_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Per-fold test metrics, best epoch and round of a finished run."""
    rows = []
    for path in sorted((run_dir / "folds").glob("*/result.json")):
        r = json.loads(path.read_text())
        row = {k: float(r["metrics"].get(k, math.nan)) for k in FOLD_KEYS}
        row.update(
            fold=path.parent.name,
            best_epoch=r["best_epoch"],
            best_round=r.get("best_round", 0),
        )
        rows.append(row)
    return rows


def wilcoxon_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p of ``a - b`` (None: no non-zero difference)."""
    from scipy.stats import wilcoxon

    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    if not np.any(d != 0):
        return None
    return float(wilcoxon(d).pvalue)


def summarise(run_root: Path, variants: tuple[str, ...]) -> dict[str, Any]:
    """Mean/std per metric, per-fold rows and p-values against ``plain``."""
    out: dict[str, Any] = {}
    runs = {
        v: run_root / v for v in variants if (run_root / v / "summary.json").is_file()
    }
    splits = {v: (d / "splits.csv").read_text() for v, d in runs.items()}
    if len(set(splits.values())) > 1:
        msg = f"{run_root}: the variants' splits differ"
        raise SystemExit(msg)
    base = variants[0]
    plain = fold_rows(runs[base]) if base in runs else None
    # Li 2019's mined variants are adaptive weighting + mining: also against adaptive
    adaptive = fold_rows(runs["adaptive"]) if "adaptive" in runs else None
    for v, d in runs.items():
        rows = fold_rows(d)
        entry: dict[str, Any] = {"n_folds": len(rows), "folds": rows}
        for k in FOLD_KEYS:
            vals = np.array([r[k] for r in rows], float)
            if np.isfinite(vals).any():
                entry[k] = {
                    "mean": float(np.nanmean(vals)),
                    "std": float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0,
                }
                if plain is not None and v != base:
                    entry[k]["p_vs_plain"] = wilcoxon_p(
                        [r[k] for r in rows], [r[k] for r in plain]
                    )
                if adaptive is not None and v not in (base, "adaptive"):
                    entry[k]["p_vs_adaptive"] = wilcoxon_p(
                        [r[k] for r in rows], [r[k] for r in adaptive]
                    )
        entry["best_epochs"] = [r["best_epoch"] for r in rows]
        entry["best_rounds"] = [r["best_round"] for r in rows]
        entry["collapsed_folds"] = sum(
            1 for r in rows if r["best_epoch"] <= 2 or r["auc"] < 0.6
        )
        wall = d / "wall_seconds.txt"
        entry["wall_seconds"] = float(wall.read_text()) if wall.is_file() else None
        out[v] = entry
    return out


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(args: argparse.Namespace) -> None:
    """Collect every finished study/dataset into one JSON and print tables."""
    import scipy

    from tiahnm.utils.provenance import write_result

    results: dict[str, Any] = {}
    for study, variants in STUDIES.items():
        for d in sorted((args.work_dir / study).glob("*")):
            if (d / variants[0] / "summary.json").is_file():
                results[f"{study}/{d.name}"] = summarise(d, variants)
    for name, rows in results.items():
        print(f"\n## {name}\n")
        print("| variant | bag AUC | accuracy | FPR | instance AUC | best epochs |")
        print("|---|---|---|---|---|---|")
        for v, e in rows.items():
            cells = []
            for k in FOLD_KEYS:
                if k not in e:
                    cells.append("-")
                    continue
                p = e[k].get("p_vs_plain")
                ps = "" if p is None else f" (p {p:.3g})"
                cells.append(f"{e[k]['mean']:.3f} ± {e[k]['std']:.3f}{ps}")
            print(f"| {v} | " + " | ".join(cells) + f" | {e['best_epochs']} |")
    write_result(
        args.out,
        {
            "commit": _commit(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "scipy": scipy.__version__,
            },
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "argv": sys.argv,
            "commands": args.command
            or [
                "python benchmarks/hard_mining_compare.py --study mhim --dataset "
                "mnist10 --repeats 2",
                "python benchmarks/hard_mining_compare.py --study mhim --dataset "
                "ucsb --repeats 2",
                "python benchmarks/hard_mining_compare.py --study li2019 --dataset "
                "mnist_hard --repeats 2",
                "python benchmarks/hard_mining_compare.py --study li2019 --dataset "
                "mnist_hard --repeats 2 --variants fmb_oof",
                "python benchmarks/hard_mining_compare.py --study mhim --dataset "
                "mnist50 --repeats 2 --variants plain mhim mhim_init",
                "python benchmarks/hard_mining_compare.py --study stability --dataset "
                "mnist10 --repeats 2 --epochs 20 --n-bags 100",
                "python benchmarks/hard_mining_compare.py --report",
            ],
            "protocol": "4-fold CV x repeats, identical splits and seeds for every "
            "variant of a study/dataset; 20% of each training fold for validation "
            "(epoch, and round, by validation loss); threshold 0.5; abmil_gated "
            "(embed 128, attn 64, dropout 0); Adam lr 5e-4, wd 1e-4, cosine, "
            "patience 15; end-to-end variants (e2e_*): encoder_mil = small_cnn "
            "(out 64, width 16) + abmil_gated (embed 64, attn 32), feature_norm batch "
            "except e2e_plain/e2e_stable; p-values: two-sided Wilcoxon signed-rank of "
            "the per-fold differences against the first variant of the study "
            "(plain / e2e_plain / e2e_featnorm)",
            "results": results,
        },
    )


def main() -> None:
    """Run a study on a dataset, or report."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "hard_mining")
    p.add_argument("--study", choices=tuple(STUDIES), default="mhim")
    p.add_argument(
        "--dataset",
        choices=("ucsb", "ucsb_images", "mnist10", "mnist50", "mnist_hard"),
        default="mnist10",
    )
    p.add_argument("--variants", nargs="*")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--n-bags", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true")
    p.add_argument(
        "--command",
        action="append",
        help="with --report: a command that produced the runs (repeat; kept in the JSON)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "hard_mining_compare.json",
    )
    args = p.parse_args()
    if args.report:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
