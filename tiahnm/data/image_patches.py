"""A folder of images + labels CSV as MIL bags of image patches (UCSB breast TMA style).

Each image is one bag; its instances are the non-overlapping ``patch_size`` patches
(stride ``patch_size``; a partial patch at the right or bottom edge is dropped), stored
flattened ``[N, C*H*W]`` in ``[0, 1]`` (channel-major, so ``reshape(N, C, H, W)`` gives
the patches back) with their top-left ``(x, y)`` in ``coords``. Mostly-white
background patches are dropped: a pixel is near-white when every channel is
``>= white_level`` (0-255), and a patch is dropped when more than
``max_white_fraction`` of its pixels are near-white, or when its mean intensity is
``>= max_mean_intensity``. The encoder-plus-head ``encoder_mil`` trains on these bags
directly, with ``head.options.image_shape: [C, patch_size, patch_size]``.
How many patches the background filter drops is logged per image and in total.

With ``instance_labels: DIR`` each bag also carries instance labels, from
``DIR/<stem>_mask.png`` (nonzero = positive) or ``DIR/<stem>.geojson`` polygons in
image pixels (:mod:`tiahnm.data.instance_labels`): a patch is positive when at least
``min_overlap`` of it is inside; instance AUC/AP/F1 are then evaluated.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from tiahnm.data.bag import Bag
from tiahnm.data.instance_labels import (
    check_instance_options,
    instance_labels_for,
)
from tiahnm.errors import DataError
from tiahnm.utils.logs import log_dropped

MODES = {"RGB": 3, "L": 1}


def tile_image(
    image: np.ndarray, patch_size: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Patches ``[N, h, w, C]`` and their top-left ``(x, y)`` ``[N, 2]``, row-major."""
    stride = stride or patch_size
    h, w, c = image.shape
    ys = np.arange(0, h - patch_size + 1, stride)
    xs = np.arange(0, w - patch_size + 1, stride)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    if stride == patch_size:  # a view: crop, split both axes, put the grid first
        crop = image[: len(ys) * patch_size, : len(xs) * patch_size]
        grid = crop.reshape(len(ys), patch_size, len(xs), patch_size, c)
        patches = grid.transpose(0, 2, 1, 3, 4).reshape(-1, patch_size, patch_size, c)
    else:
        patches = np.zeros((len(coords), patch_size, patch_size, c), image.dtype)
        for i, (x, y) in enumerate(coords):
            patches[i] = image[y : y + patch_size, x : x + patch_size]
    return patches, coords


def background_mask(
    patches: np.ndarray,
    *,
    white_level: int = 220,
    max_white_fraction: float = 0.5,
    max_mean_intensity: float = 255.0,
) -> np.ndarray:
    """``[N]`` True for the patches to drop (mostly white), from uint8 ``[N, h, w, C]``."""
    if len(patches) == 0:
        return np.zeros(0, dtype=bool)
    white = (patches >= white_level).all(axis=-1)
    frac = white.reshape(len(patches), -1).mean(axis=1)
    mean = patches.reshape(len(patches), -1).mean(axis=1)
    return (frac > max_white_fraction) | (mean >= max_mean_intensity)


class ImagePatchBags:
    """One bag per image of non-overlapping patches, labels from a CSV.

    Args:
        root (str): Folder of the images.
        labels_csv (str | None): CSV with an image-file column and a label column
            (default ``root/labels.csv``).
        image_column (str): Column of the image file names, relative to ``root``
            (UCSB: ``image``).
        label_column (str): Column of the integer labels (UCSB: ``malignant``).
        patch_size (int): Patch side in pixels (32).
        stride (int | None): Step between patches (default ``patch_size``: no
            overlap).
        mode (str): ``RGB`` (3 channels) or ``L`` (grey).
        white_level (int): A pixel with every channel ``>=`` this is near-white.
        max_white_fraction (float): Drop patches with more near-white pixels than
            this fraction.
        max_mean_intensity (float): Also drop patches whose mean (0-255) is ``>=``
            this (255: off).
        instance_labels (str | None): Folder of ``<stem>_mask.png`` masks or
            ``<stem>.geojson`` polygons giving instance labels (evaluation only); a
            negative image without a file has only negative patches.
        min_overlap (float): A patch is positive when at least this fraction of it
            is inside the positive region.
        patient_column (str): Patient column (``case_id`` also accepted for the
            default); cross-validation groups by it.
        time_column (str): Survival time column (read when present).
        event_column (str): Survival event column (0/1).
    """

    def __init__(
        self,
        root: str,
        *,
        labels_csv: str | None = None,
        image_column: str = "image",
        label_column: str = "malignant",
        patch_size: int = 32,
        stride: int | None = None,
        mode: str = "RGB",
        white_level: int = 220,
        max_white_fraction: float = 0.5,
        max_mean_intensity: float = 255.0,
        instance_labels: str | None = None,
        min_overlap: float = 0.5,
        patient_column: str = "patient_id",
        time_column: str = "time",
        event_column: str = "event",
    ) -> None:
        self.cohort_columns = {
            "patient_column": patient_column,
            "time_column": time_column,
            "event_column": event_column,
        }
        if patch_size < 1 or (stride is not None and stride < 1):
            msg = f"data.options: patch_size and stride must be >= 1, got {patch_size}, {stride}."
            raise DataError(msg)
        if mode not in MODES:
            msg = f"data.options.mode must be one of {', '.join(MODES)}, got {mode!r}."
            raise DataError(msg)
        if not 0.0 <= max_white_fraction <= 1.0:
            msg = f"data.options.max_white_fraction must be in [0, 1], got {max_white_fraction}."
            raise DataError(msg)
        self.root = Path(root)
        self.labels_csv = Path(labels_csv) if labels_csv else self.root / "labels.csv"
        self.image_column = image_column
        self.label_column = label_column
        self.patch_size = patch_size
        self.stride = stride or patch_size
        self.mode = mode
        self.white_level = white_level
        self.max_white_fraction = max_white_fraction
        self.max_mean_intensity = max_mean_intensity
        self.instance_labels = check_instance_options(instance_labels, min_overlap)
        self.min_overlap = float(min_overlap)

    def _rows(self) -> list[tuple[str, int]]:
        path = self.labels_csv
        if not path.is_file():
            msg = f"{path}: labels CSV not found."
            raise DataError(msg)
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            for col in (self.image_column, self.label_column):
                if col not in fields:
                    msg = f"{path}: no column {col!r} (columns: {', '.join(fields)})."
                    raise DataError(msg)
            rows = []
            for line, row in enumerate(reader, start=2):
                name = (row[self.image_column] or "").strip()
                value = (row[self.label_column] or "").strip()
                try:
                    label = int(value)
                except ValueError:
                    msg = f"{path}, row {line}: label {value!r} is not an integer."
                    raise DataError(msg) from None
                if not name or label < 0:
                    msg = f"{path}, row {line}: empty image name or negative label."
                    raise DataError(msg)
                rows.append((name, label))
        if not rows:
            msg = f"{path}: no rows."
            raise DataError(msg)
        return rows

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if not path.is_file():
            msg = f"{path}: image listed in {self.labels_csv} not found."
            raise DataError(msg)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert(self.mode))
        except (OSError, UnidentifiedImageError) as exc:
            msg = f"{path}: not a readable image ({exc})."
            raise DataError(msg) from None
        return arr if arr.ndim == 3 else arr[..., None]

    def load(self) -> list[Bag]:
        """Read, tile and filter every listed image (in CSV order)."""
        from tiahnm.data.cohort import apply_cohort, read_cohort_columns

        rows = self._rows()  # checks the labels CSV first (errors name file and row)
        cohort = read_cohort_columns(
            self.labels_csv, key_column=self.image_column, **self.cohort_columns
        )
        bags, dropped = [], []
        for name, label in rows:
            bag = self._bag(name, label)
            n_dropped = int(bag.meta["n_dropped"])
            dropped.append((bag.slide_id, n_dropped, bag.n_instances + n_dropped))
            bags.append(apply_cohort(bag, cohort, name, self.labels_csv))
        log_dropped("image_patches", dropped, "white background")
        return bags

    def _bag(self, name: str, label: int) -> Bag:
        path = self.root / name
        image = self._read(path)
        patches, coords = tile_image(image, self.patch_size, self.stride)
        drop = background_mask(
            patches,
            white_level=self.white_level,
            max_white_fraction=self.max_white_fraction,
            max_mean_intensity=self.max_mean_intensity,
        )
        patches, coords = patches[~drop], coords[~drop]
        if len(patches) == 0:
            msg = (
                f"{path}: no {self.patch_size}px patch left after dropping "
                "white background; lower white_level filtering or check the image."
            )
            raise DataError(msg)
        inst = None
        if self.instance_labels is not None:
            inst = instance_labels_for(
                self.instance_labels,
                Path(name).stem,
                label,
                coords,
                self.patch_size,
                (image.shape[1], image.shape[0]),
                min_overlap=self.min_overlap,
                source=str(path),
            )
        chw = patches.transpose(0, 3, 1, 2).reshape(len(patches), -1)
        return Bag(
            slide_id=Path(name).stem,
            label=label,
            features=torch.from_numpy(chw.astype(np.float32) / 255.0),
            coords=coords,
            instance_labels=inst,
            source=str(path),
            meta={
                "image_shape": [image.shape[2], self.patch_size, self.patch_size],
                "n_dropped": int(drop.sum()),
            },
        )


__all__ = ["ImagePatchBags", "background_mask", "tile_image"]
