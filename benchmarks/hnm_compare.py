"""HNM-WSI evidence: DSMIL vs DSMIL + MI-Rank vs the full HNM loop (5% and 100%).

Every variant is an ``encoder_mil`` head (patch encoder + DSMIL) under the ``hnm``
miner, on the same folds and seeds, so the encoder, the features and the splits are
shared and only the method differs:

* ``dsmil``: one MIL round on the frozen initial encoder, one bag per step;
* ``dsmil_mirank``: the same with (positive, negative) bag pairs and MI-Rank
  (K = 10, margin 1, weight 0.1, on instance logits);
* ``hnm_5`` / ``hnm_100``: ``--rounds`` MIL rounds with SupCon fine-tuning of the
  encoder between them on 5% / 100% of the negative-slide patches, plus MI-Rank;
* ``dsmil_e2e`` (reference): encoder and DSMIL trained end to end (miner ``none``).

Datasets: the 58 UCSB breast TMA images (``image_patches``, 32 px patches, white
background dropped; bag labels only) and MNIST-bags (``mnist_bags``, 28 px digits,
instance labels known, so instance AUC is reported). Per variant the JSON holds the
bag AUC / accuracy (mean, std over folds), instance AUC where labels exist, the
encoder fine-tuning seconds per fold (sum over rounds) and the wall time.

The encoder starts from ``--encoder-weights`` (a local file for ``--encoder``) or,
by default, a seeded random initialisation (the paper starts from SimCLR weights;
this is recorded in the JSON).

Usage::

    python benchmarks/hnm_compare.py --data-dir ../shared/data            # full
    python benchmarks/hnm_compare.py --data-dir ../shared/data --quick    # smoke run
    python benchmarks/hnm_compare.py --report                              # collect runs
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiahnm.config import from_dict  # noqa: E402
from tiahnm.crossval import run_training  # noqa: E402
from tiahnm.plugins import get_registry  # noqa: E402
from tiahnm.utils.provenance import write_result  # noqa: E402

VARIANTS = ("dsmil", "dsmil_mirank", "hnm_5", "hnm_100", "dsmil_e2e")
MIRANK = {"name": "mirank", "weight": 0.1, "options": {"k": 10, "margin": 1.0}}


def dataset_spec(name: str, data_dir: Path, quick: bool) -> dict[str, Any]:
    """Bag source, image shape and CV protocol of a dataset."""
    if name == "ucsb":
        return {
            "source": "image_patches",
            "options": {"root": str(data_dir / "ucsb-breast-tma"), "patch_size": 32},
            "image_shape": [3, 32, 32],
            "folds": 2 if quick else 4,
            "repeats": 1 if quick else 5,
            "subset": 12 if quick else None,
        }
    if name == "mnist":
        return {
            "source": "mnist_bags",
            "options": {
                "path": str(data_dir / "mnist-5k" / "mnist_5k.csv.gz"),
                "n_bags": 24 if quick else 200,
                "mean_bag_size": 10.0,
                "std_bag_size": 2.0,
                "seed": 0,
            },
            "image_shape": [1, 28, 28],
            "folds": 2 if quick else 5,
            "repeats": 1 if quick else 2,
            "subset": None,
        }
    msg = f"unknown dataset {name!r}; use ucsb or mnist."
    raise SystemExit(msg)


def load(spec: dict[str, Any]) -> list:
    """The dataset's bags (a class-balanced subset in quick mode)."""
    bags = get_registry("bag_source").create(spec["source"], **spec["options"]).load()
    if spec["subset"]:
        half = spec["subset"] // 2
        bags = [b for b in bags if b.label == 0][:half] + [
            b for b in bags if b.label == 1
        ][:half]
    return bags


def config_for(
    variant: str, spec: dict[str, Any], args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """The run config of one (dataset, variant) cell."""
    encoder_options: dict[str, Any] = {}
    if args.encoder == "small_cnn":
        encoder_options = {"out_dim": 64, "width": 16}
    head = {
        "name": "encoder_mil",
        "options": {
            "image_shape": spec["image_shape"],
            "encoder": args.encoder,
            "encoder_options": encoder_options,
            "weights": args.encoder_weights,
            "head": "dsmil",
            "head_options": {"embed_dim": 64, "query_dim": 32, "dropout": 0.0},
        },
    }
    hnm = {
        "pair_bags": "none",
        "finetune_epochs": args.finetune_epochs,
        "batch_size": args.batch_size,
        "warmup": 1,
        "spl_epochs": max(1, args.finetune_epochs * (args.rounds - 1) - 1),
        "proj_dim": 64,
    }
    rounds, losses, miner = 1, [], {"name": "hnm", "options": hnm}
    if variant == "dsmil_mirank":
        hnm["pair_bags"] = "min"
        losses = [MIRANK]
    elif variant in ("hnm_5", "hnm_100"):
        hnm["pair_bags"] = "min"
        hnm["neg_ratio"] = 0.05 if variant == "hnm_5" else 1.0
        rounds, losses = args.rounds, [MIRANK]
    elif variant == "dsmil_e2e":
        miner = {"name": "none", "options": {}}
    return {
        "output_dir": str(out),
        "seed": args.seed,
        "data": {"source": spec["source"], "options": spec["options"]},
        "head": head,
        "miner": miner,
        "losses": losses,
        "train": {
            "epochs": args.epochs,
            "rounds": rounds,
            "lr": 2e-4,
            "weight_decay": 1e-4,
            "patience": args.epochs,
            "monitor": "val_auc",
            "num_threads": args.threads,
            "progress": False,
        },
        "cv": {"folds": spec["folds"], "repeats": spec["repeats"], "val_fraction": 0.2},
        "evaluation": {"bootstrap": 0, "report": False},
    }


def paired(rows: dict[str, Any], base: str = "dsmil") -> None:
    """Add, per variant, the fold-by-fold bag-AUC comparison with ``base``."""
    if base not in rows:
        return
    ref = rows[base]["fold_auc"]
    for name, row in rows.items():
        common = sorted(set(ref) & set(row["fold_auc"]))
        if name == base or not common:
            continue
        diff = np.array([row["fold_auc"][k] - ref[k] for k in common])
        row[f"vs_{base}"] = {
            "folds": len(common),
            "auc_diff_mean": float(diff.mean()),
            "wins_ties_losses": [
                int((diff > 1e-9).sum()),
                int((abs(diff) <= 1e-9).sum()),
                int((diff < -1e-9).sum()),
            ],
        }


def row_from_dir(out: Path) -> dict[str, Any]:
    """One variant's numbers from its finished run folder."""
    summary = json.loads((out / "summary.json").read_text())
    results = [
        json.loads(p.read_text()) for p in sorted((out / "folds").glob("*/result.json"))
    ]
    # fine-tuning seconds of a fold: the running total of its last history row
    ft = [
        max(
            (r.get("hnm_finetune_seconds_total", 0.0) for r in res["history"]),
            default=0.0,
        )
        for res in results
    ]
    return {
        "bag_auc": metric(summary, "auc"),
        "bag_accuracy": metric(summary, "accuracy"),
        "instance_auc": metric(summary, "instance_auc"),
        "finetune_seconds_per_fold": float(np.mean(ft)) if ft else 0.0,
        "train_seconds_per_fold": (
            float(np.mean([res["seconds"] for res in results])) if results else 0.0
        ),
        "n_folds": summary["n_folds"],
        "n_repeats": len({res["repeat"] for res in results}),
        "fold_auc": {
            f"r{res['repeat']}_f{res['fold']}": float(res["metrics"]["auc"])
            for res in results
        },
    }


def metric(summary: dict[str, Any], key: str) -> dict[str, float] | None:
    """``{mean, std}`` of a metric over folds, or None when absent."""
    m = summary["metrics"].get(key)
    if m is None:
        return None
    return {"mean": float(m["mean"]), "std": float(m.get("std", math.nan))}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, default=ROOT.parent / "shared" / "data"
    )
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "hnm_compare")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--datasets", nargs="+", default=["ucsb", "mnist"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--encoder", default="small_cnn")
    parser.add_argument("--encoder-weights", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=None, help="CV repeats (default per dataset)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="no training: collect the finished runs under --work-dir into the JSON",
    )
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 40)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.finetune_epochs = args.finetune_epochs or (1 if args.quick else 5)
    if args.quick:
        args.batch_size = min(args.batch_size, 128)
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad:
        parser.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    name = "hnm_compare_quick.json" if args.quick else "hnm_compare.json"
    out_json = args.out or ROOT / "benchmarks" / "results" / name
    results: dict[str, Any] = {
        "quick": args.quick,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        },
        "encoder_init": args.encoder_weights or "random-init (seeded)",
        "torch": torch.__version__,
        "machine": platform.platform(),
        "datasets": {},
    }
    for ds in args.datasets:
        spec = dataset_spec(ds, args.data_dir, args.quick)
        if args.repeats:
            spec["repeats"] = args.repeats
        bags = load(spec)
        rows = {}
        for variant in args.variants:
            out = args.work_dir / ("quick" if args.quick else "full") / ds / variant
            if args.report:
                if not (out / "summary.json").is_file():
                    continue
                rows[variant] = row_from_dir(out)
                continue
            config = from_dict(config_for(variant, spec, args, out))
            t0 = time.perf_counter()
            run_training(config, bags=bags)
            rows[variant] = row_from_dir(out)
            rows[variant]["wall_seconds"] = time.perf_counter() - t0
            auc = rows[variant]["bag_auc"] or {"mean": math.nan}
            print(
                f"{ds:6s} {variant:13s} auc {auc['mean']:.3f} "
                f"finetune {rows[variant]['finetune_seconds_per_fold']:.1f}s "
                f"wall {rows[variant]['wall_seconds']:.1f}s",
                flush=True,
            )
        paired(rows)
        results["datasets"][ds] = {
            "n_bags": len(bags),
            "n_instances": int(sum(b.n_instances for b in bags)),
            "folds": spec["folds"],
            "repeats": max(
                (r["n_repeats"] for r in rows.values()), default=spec["repeats"]
            ),
            "variants": rows,
        }
    write_result(out_json, results)
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
