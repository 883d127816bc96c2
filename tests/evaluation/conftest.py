"""A tiny trained run over synthetic h5 feature files, shared by the evaluation tests."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import make_bags

GRID = 4  # patches per row
PATCH = 64  # level-0 patch size


@dataclass
class TrainedRun:
    """Paths of the shared run."""

    root: Path
    features: Path
    labels: Path
    run: Path


def grid_coords(n: int) -> np.ndarray:
    """``[n, 2]`` top-left corners on a GRID-wide grid of PATCH-pixel patches."""
    i = np.arange(n)
    return np.stack([(i % GRID) * PATCH, (i // GRID) * PATCH], axis=1)


def write_features(folder: Path, n_bags: int = 16) -> Path:
    """``folder/<id>.h5`` for synthetic bags, and ``folder.parent/labels.csv``."""
    from tiahnm.slides.store import write_feature_file

    folder.mkdir(parents=True, exist_ok=True)
    bags = make_bags(n_bags, dim=8, seed=3, min_n=6, max_n=12)
    for b in bags:
        n = b.n_instances
        write_feature_file(
            folder / f"{b.slide_id}.h5",
            features=b.features.numpy(),
            coords=grid_coords(n),
            attrs={"level0_dimensions": [GRID * PATCH, 3 * PATCH]},
            coords_attrs={"patch_size_level0": [PATCH, PATCH]},
            instance_labels=b.instance_labels,
        )
    labels = folder.parent / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        for b in bags:
            w.writerow([b.slide_id, b.label])
    return labels


def train_config(root: Path, features: Path, labels: Path, **evaluation):
    from tiahnm.config import from_dict

    return from_dict(
        {
            "output_dir": str(root / "run"),
            "data": {
                "source": "h5_folder",
                "options": {"features_dir": str(features), "labels_csv": str(labels)},
            },
            "head": {"name": "abmil", "options": {"embed_dim": 16, "attn_dim": 8}},
            "train": {"epochs": 3, "lr": 0.01, "progress": False},
            "cv": {"folds": 2, "repeats": 1, "val_fraction": 0.25},
            "evaluation": {"threshold": "youden", "bootstrap": 200, **evaluation},
        }
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """Train once per session: 16 bags, 2 folds, 3 epochs."""
    from tiahnm.crossval import run_training

    root = tmp_path_factory.mktemp("evalrun")
    features = root / "features"
    labels = write_features(features)
    run_training(train_config(root, features, labels, instance_threshold="youden"))
    return TrainedRun(root, features, labels, root / "run")
