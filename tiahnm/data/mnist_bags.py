"""MNIST-bags (Ilse et al. 2018): a bag is positive iff it holds a target digit."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from tiahnm.data.bag import Bag
from tiahnm.errors import DataError


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, 784]`` (uint8) and digits ``[n]`` from a CSV of 784 pixels + label.

    The file may be gzip-compressed (``.gz``); a header row is skipped if present.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: MNIST CSV not found."
        raise DataError(msg)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            first = fh.readline()
            skip = 0 if first.split(",")[0].strip().lstrip("-").isdigit() else 1
        data = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        msg = f"{path}: not a readable MNIST CSV ({exc})."
        raise DataError(msg) from None
    if data.ndim != 2 or data.shape[1] != 785:
        msg = f"{path}: expected 785 columns (784 pixels + label), got {data.shape}."
        raise DataError(msg)
    return data[:, :784].astype(np.uint8), data[:, 784]


class MNISTBags:
    """Bags of MNIST digits; instance labels mark the target digit.

    Bag sizes are drawn from a Gaussian (``mean_bag_size``, ``std_bag_size``), rounded
    and clipped to at least 1. With ``balanced`` half the bags are positive: negative
    bags draw only non-target digits, positive bags get at least one target digit.
    Features are the pixels scaled to [0, 1] (``[N, 784]``); ``as_images`` keeps them
    as ``[N, 1, 28, 28]`` for an end-to-end encoder.

    Hard negatives by construction (to test Li et al. 2019 cheaply): with
    ``hard_digits`` (digits confusable with the target, e.g. 4 and 7 for 9) and
    ``hard_fraction`` > 0, that fraction of every bag's instances (rounded) is drawn
    from ``hard_digits`` before the target digits of a positive bag are placed, in
    negative and positive bags alike, so a hard digit says nothing about the bag
    label (requires ``balanced``).

    Args:
        path (str): CSV of 784 pixels + digit label (e.g. ``mnist_5k.csv.gz``).
        target (int): The digit that makes a bag positive.
        n_bags (int): Number of bags.
        mean_bag_size (float): Mean bag size.
        std_bag_size (float): Standard deviation of the bag size.
        balanced (bool): Half positive, half negative bags.
        seed (int): Seed of the bag construction.
        as_images (bool): Keep instances as images.
        hard_digits (list[int] | None): Digits confusable with the target.
        hard_fraction (float): Fraction of each bag's instances drawn from them.
    """

    def __init__(
        self,
        path: str,
        *,
        target: int = 9,
        n_bags: int = 200,
        mean_bag_size: float = 10.0,
        std_bag_size: float = 2.0,
        balanced: bool = True,
        seed: int = 0,
        as_images: bool = False,
        hard_digits: list[int] | None = None,
        hard_fraction: float = 0.0,
    ) -> None:
        if n_bags < 2 or mean_bag_size < 1 or std_bag_size < 0:
            msg = (
                "data.options: need n_bags >= 2, mean_bag_size >= 1, std_bag_size >= 0."
            )
            raise DataError(msg)
        self.path = path
        self.target = target
        self.n_bags = n_bags
        self.mean_bag_size = mean_bag_size
        self.std_bag_size = std_bag_size
        self.balanced = balanced
        self.seed = seed
        self.as_images = as_images
        self.hard_digits = sorted(set(hard_digits or []))
        self.hard_fraction = float(hard_fraction)
        if not 0.0 <= self.hard_fraction <= 1.0 or target in self.hard_digits:
            msg = (
                "data.options: hard_fraction must be in [0, 1] and hard_digits must "
                f"not hold the target {target}."
            )
            raise DataError(msg)
        if self.hard_fraction > 0 and (not self.hard_digits or not balanced):
            msg = "data.options.hard_fraction needs hard_digits and balanced: true."
            raise DataError(msg)

    def load(self) -> list[Bag]:
        """Build the bags (deterministic under ``seed``)."""
        images, digits = read_mnist_csv(self.path)
        is_target = digits == self.target
        if not is_target.any() or is_target.all():
            msg = f"{self.path}: digit {self.target} must occur, and not alone."
            raise DataError(msg)
        rng = np.random.default_rng(self.seed)
        targets = np.flatnonzero(is_target)
        others = np.flatnonzero(~is_target)
        hard = np.isin(digits, self.hard_digits)
        if self.hard_fraction > 0 and not hard.any():
            msg = f"{self.path}: none of the hard_digits {self.hard_digits} occurs."
            raise DataError(msg)
        hard_pool, easy_pool = np.flatnonzero(hard), np.flatnonzero(~hard & ~is_target)
        bags = []
        for i in range(self.n_bags):
            size = max(1, round(rng.normal(self.mean_bag_size, self.std_bag_size)))
            if self.balanced:
                want_positive = i % 2 == 1
                idx = rng.choice(others, size=size, replace=False)
                if self.hard_fraction > 0:
                    n_hard = round(self.hard_fraction * size)
                    idx = np.concatenate(
                        [
                            rng.choice(hard_pool, size=n_hard, replace=False),
                            rng.choice(easy_pool, size=size - n_hard, replace=False),
                        ]
                    )[rng.permutation(size)]
                if want_positive:
                    n_pos = int(rng.integers(1, max(1, size // 4) + 1))
                    slots = rng.choice(size, size=n_pos, replace=False)
                    idx[slots] = rng.choice(targets, size=n_pos, replace=False)
            else:
                idx = rng.choice(len(digits), size=size, replace=False)
            inst = is_target[idx].astype(np.int64)
            pixels = images[idx].astype(np.float32) / 255.0
            feats = pixels.reshape(-1, 1, 28, 28) if self.as_images else pixels
            bags.append(
                Bag(
                    slide_id=f"mnist_bag_{i:04d}",
                    label=int(inst.any()),
                    features=torch.from_numpy(feats),
                    instance_labels=inst,
                    source=str(self.path),
                    meta={"digits": digits[idx].tolist()},
                )
            )
        return bags
