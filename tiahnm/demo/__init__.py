"""The built-in demo: ``tiahnm run --demo`` (or ``tiahnm run`` without a config).

It needs nothing but the package: :mod:`tiahnm.demo.data` draws a handful of small
synthetic H&E-like slides with known tumour regions, and :func:`prepare_demo` writes a
config that takes them through every stage of ``tiahnm run``: TIAToolbox tissue
masking and tiling, a small random-init CNN encoder, AB-MIL with MHIM-MIL hard-instance
mining under 3-fold CV, evaluation (slide and patch level), heatmaps and the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tiahnm.demo.data import CLASSES, DemoData, DemoDataSpec, make_demo_data
from tiahnm.utils.io import atomic_open

#: Default demo folder (relative to the working directory).
DEFAULT_OUTPUT = "tiahnm-demo"

#: A small MHIM-MIL setting for short runs: a faster-moving EMA teacher (few
#: optimiser steps) and more of the high-attention instances masked than the
#: published C16 preset, whose 0.9999 momentum needs thousands of steps.
DEMO_MHIM: dict[str, Any] = {
    "mask_ratio_h": 0.05,
    "mask_ratio_hr": 0.5,
    "mask_ratio_r": 0.3,
    "mask_h_schedule": "cosine",
    "consistency_weight": 0.1,
    "momentum": 0.99,
    "score": "attention",
}

#: Data set sizes: ``full`` is the demo, ``quick`` a smoke test of the install.
SIZES: dict[str, DemoDataSpec] = {
    "full": DemoDataSpec(n_slides=12, width=2048, height=1536),
    "quick": DemoDataSpec(n_slides=4, width=1024, height=768),
}


def demo_config(
    root: str | Path, data: DemoData, *, size: str = "full"
) -> dict[str, Any]:
    """The demo's run config (a plain dict, as in a YAML file).

    Args:
        root (str | Path): The demo folder; results go there too.
        data (DemoData): The generated data.
        size (str): ``full`` or ``quick`` (2 folds, 2 epochs, fewer heatmaps).

    Returns:
        dict: The config.
    """
    quick = size == "quick"
    return {
        "output_dir": str(Path(root).resolve()),
        "seed": 0,
        "extract": {
            "slides": [str(data.slides_dir.resolve())],
            "annotations": str(data.annotations_dir.resolve()),
            "encoder": "small_cnn",
            "encoder_options": {"out_dim": 64, "width": 16},
            "resolution": 1.0,
            "units": "mpp",
            "patch_size": 64,
            "masker": "otsu",
            "min_tissue": 0.5,
            "batch_size": 128,
        },
        "data": {
            "source": "h5_folder",
            "options": {
                "labels_csv": str(data.labels_csv.resolve()),
                "classes": list(CLASSES),
            },
            "standardize": True,
        },
        "head": {
            "name": "abmil",
            "options": {"embed_dim": 64, "attn_dim": 32, "dropout": 0.1},
        },
        "miner": {"name": "mhim", "options": dict(DEMO_MHIM)},
        "train": {
            "epochs": 2 if quick else 40,
            "lr": 5e-4,
            "weight_decay": 1e-4,
            "scheduler": "cosine",
            "monitor": "val_loss",
            "patience": 15,
        },
        "cv": {"folds": 2 if quick else 3, "val_fraction": 0.0 if quick else 0.25},
        "evaluation": {
            "threshold": "0.5",
            "bootstrap": 50 if quick else 200,
            "heatmaps": 2 if quick else 4,
        },
    }


def prepare_demo(
    root: str | Path = DEFAULT_OUTPUT,
    *,
    size: str = "full",
    on_slide: Callable[[str], None] | None = None,
) -> tuple[Path, bool]:
    """Write the demo data (unless already there) and ``root/demo.yaml``.

    Args:
        root (str | Path): The demo folder (created).
        size (str): ``full`` or ``quick`` (see :data:`SIZES`).
        on_slide (Callable[[str], None] | None): Called with each slide id drawn.

    Returns:
        tuple: ``(config path, whether slides were drawn)``.
    """
    if size not in SIZES:
        from tiahnm.errors import ConfigError

        msg = f"demo size must be one of {', '.join(SIZES)}, got {size!r}."
        raise ConfigError(msg)
    root = Path(root)
    data = make_demo_data(root, SIZES[size], on_slide=on_slide)
    path = root / "demo.yaml"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(
            "# The tiahnm demo (written by `tiahnm run --demo`); run it again with\n"
            f"# `tiahnm run {path}`, e.g. with --set head.name=dsmil.\n"
        )
        yaml.safe_dump(demo_config(root, data, size=size), fh, sort_keys=False)
    return path, data.generated


__all__ = [
    "DEFAULT_OUTPUT",
    "DEMO_MHIM",
    "SIZES",
    "DemoData",
    "DemoDataSpec",
    "demo_config",
    "make_demo_data",
    "prepare_demo",
]
