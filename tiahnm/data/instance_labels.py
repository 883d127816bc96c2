"""Instance (patch) labels of image and slide bags from masks or polygons.

The ``image_patches`` and ``slide_patches`` sources take ``instance_labels: DIR``: a
folder holding, for the image or slide with file stem ``<stem>``, one of

* ``<stem>_mask.png`` (or ``_mask.tif``/``_mask.tiff``/``_mask.npy``): a binary mask,
  nonzero = positive, covering the whole image or slide at any downsample (its scale
  is its size over the image's, or the slide's level-0, size);
* ``<stem>.geojson`` (or ``.json``): polygons in image pixels (level-0 pixels for
  slides), read as by ``tiahnm extract --annotations``;
* ``<stem>.xml``: ASAP / Camelyon polygons (level-0 pixels).

A patch is positive when at least ``min_overlap`` of its footprint lies inside the
positive region (:func:`tiahnm.slides.annotations.label_patches`). A negative bag
without an annotation file has every instance negative (the MIL assumption); a
positive bag without one is an error, since its instance labels are unknown. The
labels are evaluation ground truth only: training never reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tiahnm.errors import DataError


class InstanceLabelError(DataError):
    """Instance labels that cannot be made (the run stops; the bag is not skipped)."""


#: File names tried for ``<stem>``, in this order.
LABEL_SUFFIXES = (
    "_mask.png",
    "_mask.tif",
    "_mask.tiff",
    "_mask.npy",
    ".geojson",
    ".json",
    ".xml",
)


def check_instance_options(
    instance_labels: str | None, min_overlap: float
) -> Path | None:
    """Validate ``data.options.instance_labels`` / ``min_overlap``; the folder or None.

    Raises:
        DataError: The folder does not exist or ``min_overlap`` is outside (0, 1].
    """
    if isinstance(min_overlap, bool) or not isinstance(min_overlap, (int, float)):
        msg = f"data.options.min_overlap: expected a number, got {min_overlap!r}."
        raise DataError(msg)
    if not 0.0 < float(min_overlap) <= 1.0:
        msg = f"data.options.min_overlap must be in (0, 1], got {min_overlap}."
        raise DataError(msg)
    if instance_labels is None:
        return None
    root = Path(instance_labels)
    if not root.is_dir():
        msg = f"data.options.instance_labels: {root} is not a folder."
        raise DataError(msg)
    return root


def find_label_file(root: Path, stem: str) -> Path | None:
    """``root/<stem>_mask.png``, ``root/<stem>.geojson`` ... (first found), or None.

    Raises:
        DataError: More than one annotation file for ``stem`` (ambiguous).
    """
    found = [
        root / f"{stem}{s}" for s in LABEL_SUFFIXES if (root / f"{stem}{s}").is_file()
    ]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        msg = f"{root}: several instance-label files for {stem!r} ({names}); keep one."
        raise DataError(msg)
    return found[0] if found else None


def instance_labels_for(
    root: Path,
    stem: str,
    bag_label: int,
    coords: np.ndarray,
    patch_size: float | Sequence[float],
    dimensions: tuple[int, int],
    *,
    min_overlap: float,
    source: str,
) -> np.ndarray:
    """``[N]`` int64 instance labels of one bag (see the module doc).

    Args:
        root (Path): The ``instance_labels`` folder.
        stem (str): Image or slide file stem.
        bag_label (int): The bag label (0 = negative).
        coords (np.ndarray): ``[N, 2]`` top-left corners (image or level-0 pixels).
        patch_size (float | Sequence[float]): Patch footprint in the same pixels.
        dimensions (tuple[int, int]): Image (or level-0) ``(width, height)``.
        min_overlap (float): Positive at or above this overlap fraction.
        source (str): The image or slide file, for messages.

    Raises:
        DataError: A positive bag without annotation, or an unreadable file.
    """
    from tiahnm.slides.annotations import label_patches

    path = find_label_file(root, stem)
    if path is None:
        if bag_label != 0:
            msg = (
                f"{source}: positive bag without instance labels (no {stem}_mask.png "
                f"or {stem}.geojson in {root})."
            )
            raise InstanceLabelError(msg)
        return np.zeros(len(coords), dtype=np.int64)
    size = tuple(patch_size) if isinstance(patch_size, Sequence) else patch_size
    try:
        labels = label_patches(
            path, coords, size, dimensions=dimensions, min_overlap=min_overlap
        )
    except DataError as exc:
        raise InstanceLabelError(str(exc)) from None
    return labels.labels.astype(np.int64)


__all__ = [
    "LABEL_SUFFIXES",
    "InstanceLabelError",
    "check_instance_options",
    "find_label_file",
    "instance_labels_for",
]
