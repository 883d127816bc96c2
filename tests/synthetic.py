"""Small synthetic bags for unit tests (real-data tests use ../shared/data)."""

from __future__ import annotations

import numpy as np
import torch

from tiahnm.data.bag import Bag


def make_bags(
    n_bags: int = 24, dim: int = 8, *, seed: int = 0, min_n: int = 4, max_n: int = 12
) -> list[Bag]:
    """Positive bags hold 1-2 instances shifted along the first axis (known witnesses)."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        label = i % 2
        n = int(rng.integers(min_n, max_n + 1))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        inst = np.zeros(n, dtype=np.int64)
        if label:
            k = int(rng.integers(1, 3))
            x[:k, 0] += 4.0
            inst[:k] = 1
        bags.append(
            Bag(
                slide_id=f"bag{i:03d}",
                label=label,
                features=torch.from_numpy(x),
                instance_labels=inst,
            )
        )
    return bags


def write_mil_csv(path, bags: list[Bag]) -> None:
    """Write bags in the classic MIL CSV layout."""
    with open(path, "w") as fh:
        for b in bags:
            for row in b.features.tolist():
                fh.write(
                    ",".join([str(b.label), b.slide_id, *[f"{v:.6f}" for v in row]])
                    + "\n"
                )
