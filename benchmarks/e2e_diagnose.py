"""Why end-to-end ``encoder_mil`` + ``small_cnn`` stayed at the prior (issue 18).

One MNIST-bags split (100 bags of mean size 10, target 9; 60 for training, 40 for
validation, no test bags), the ``--study stability`` settings of
``hard_mining_compare.py`` (width 16, 64-d features, gated attention, Adam, wd 1e-4,
cosine), the same seed for every variant; per epoch the training loss and the
validation loss and AUC. Variants: ``raw`` (``feature_norm: none``, the encoder
features as they come, lr 5e-4), ``raw_lr1e-4``, ``raw_lr3e-3`` (learning rate),
``raw_groupnorm`` (the encoder's BatchNorm2d layers replaced by GroupNorm: per-bag
BatchNorm statistics in training vs running statistics in eval ruled out),
``raw_warmup_clip`` (3 warm-up epochs, gradient norm clipped to 1), ``layernorm``
(LayerNorm on each instance's features: scale without cross-instance
standardisation), ``batchnorm`` (``feature_norm: batch``, the default since issue
18). Also the features' spread at initialisation: mean over channels of the
across-instance std against the mean feature value.

Usage::

    python benchmarks/e2e_diagnose.py --epochs 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = (
    "raw",
    "raw_lr1e-4",
    "raw_lr3e-3",
    "raw_groupnorm",
    "raw_warmup_clip",
    "layernorm",
    "batchnorm",
)


def config(variant: str, args: argparse.Namespace) -> Any:
    """The run config of a variant (its train section feeds ``fit``)."""
    from tiahnm.config import from_dict

    train: dict[str, Any] = {"lr": 5e-4}
    if "lr" in variant:
        train["lr"] = float(variant.split("lr")[1])
    if variant == "raw_warmup_clip":
        train.update(warmup_epochs=3, grad_clip=1.0)
    data = args.data_dir / "mnist-5k" / "mnist_5k.csv.gz"
    opts = {"target": 9, "n_bags": 100, "mean_bag_size": 10, "std_bag_size": 2}
    head_opts = {"embed_dim": 64, "attn_dim": 32, "dropout": 0.0}
    return from_dict(
        {
            "seed": 0,
            "data": {
                "source": "mnist_bags",
                "options": {"path": str(data), "seed": 0, **opts},
            },
            "head": {
                "name": "encoder_mil",
                "options": {
                    "image_shape": [1, 28, 28],
                    "encoder": "small_cnn",
                    "encoder_options": {"out_dim": 64, "width": 16},
                    "head": "abmil_gated",
                    "head_options": head_opts,
                    "feature_norm": "batch" if variant == "batchnorm" else "none",
                },
            },
            "train": {
                "epochs": args.epochs,
                "weight_decay": 1e-4,
                "scheduler": "cosine",
                "patience": 1000,
                "num_threads": 1,
                "progress": False,
                **train,
            },
        }
    )


def build(variant: str, cfg: Any, in_dim: int) -> nn.Module:
    """The head of a variant (seeded)."""
    from tiahnm.crossval import build_head

    torch.manual_seed(0)
    head = build_head(cfg, in_dim, 2)
    if variant == "raw_groupnorm":
        net = head.encoder.net
        for i, m in enumerate(net):
            if isinstance(m, nn.BatchNorm2d):
                net[i] = nn.GroupNorm(1, m.num_features)
    if variant == "layernorm":
        head.feature_bn = nn.LayerNorm(64)
    return head


def main() -> None:
    """Train every variant on the same split and write the JSON."""
    from tiahnm.crossval import load_bags
    from tiahnm.training.loop import fit
    from tiahnm.utils.provenance import provenance, write_result

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/e2e_diagnose.json"
    )
    args = p.parse_args()
    stamp = provenance()
    torch.set_num_threads(1)
    bags = load_bags(config("raw", args))
    order = np.random.default_rng(0).permutation(len(bags))
    train = [bags[i] for i in order[:60]]
    val = [bags[i] for i in order[60:]]
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        cfg = config(variant, args)
        head = build(variant, cfg, int(bags[0].features.shape[1]))
        with torch.no_grad():
            feats = head.encoder(train[0].features.reshape(-1, 1, 28, 28))
        t0 = time.perf_counter()
        res = fit(head, train, val, cfg.train, seed=0)
        hist = res.history
        results[variant] = {
            "init_feature_mean": float(feats.mean()),
            "init_feature_std_across_instances": float(feats.std(0).mean()),
            "train_loss": [h["train_loss"] for h in hist],
            "val_loss": [h["val_loss"] for h in hist],
            "val_auc": [h["val_auc"] for h in hist],
            "best_epoch": res.best_epoch,
            "seconds": time.perf_counter() - t0,
        }
        r = results[variant]
        print(
            f"{variant}: final train loss {r['train_loss'][-1]:.3f}, best val AUC "
            f"{max(r['val_auc']):.3f}, best epoch {r['best_epoch']}",
            flush=True,
        )
    write_result(
        args.out,
        {
            "protocol": "MNIST-bags (100 bags, mean size 10, target 9), one split: 60 "
            "training / 40 validation bags, no test bags; same seed per variant",
            "results": results,
        },
        stamp=stamp,
    )


if __name__ == "__main__":
    main()
