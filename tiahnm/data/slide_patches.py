"""Whole-slide images as MIL bags of patch *images*, read through TIAToolbox.

For methods that train the patch encoder (``encoder_mil`` + the ``hnm`` miner), the
instances must be pixels, not features. Each slide is tiled like ``tiahnm extract``
does (TIAToolbox reader, tissue mask, ``resolution``/``units``, ``patch_size``) and
its patches are stored flattened ``[N, 3*p*p]`` in ``[0, 1]`` (channel-major:
``reshape(N, 3, p, p)`` gives them back), with level-0 top-left ``coords``. Use small
patches or a low resolution: a bag is held in memory (``max_patches`` caps it). A
slide that cannot be read is reported (logged with the file and the problem) and
skipped; the others load. How many grid patches the tissue filter and
``max_patches`` drop is logged per slide and in total.

With ``instance_labels: DIR`` each bag carries instance labels from
``DIR/<slide_id>_mask.png`` (nonzero = positive, any downsample of level 0) or
``DIR/<slide_id>.geojson`` polygons in level-0 pixels
(:mod:`tiahnm.data.instance_labels`), so instance AUC/AP/F1 are evaluated.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tiahnm.data.bag import Bag
from tiahnm.data.h5_features import read_labels_csv
from tiahnm.data.instance_labels import (
    InstanceLabelError,
    check_instance_options,
    instance_labels_for,
)
from tiahnm.errors import DataError
from tiahnm.utils.logs import log_dropped

logger = logging.getLogger(__name__)


class SlidePatchBags:
    """One bag of patch images per labelled slide.

    Args:
        slides (str | list[str]): Slide files or folders (any format TIAToolbox or
            OpenSlide reads).
        labels_csv (str): ``slide_id,label`` CSV (slide id = file name without suffix).
        resolution (float): Target resolution in ``units`` (TIAToolbox names).
        units (str): ``mpp``, ``power`` or ``baseline``.
        patch_size (int): Patch side in pixels at the target resolution.
        stride (int | None): Step between patches (default ``patch_size``).
        masker (str): ``otsu``, ``morphological`` or ``none``.
        min_tissue (float): Minimum tissue fraction of a kept patch.
        mpp (float | None): Level-0 microns per pixel for slides without metadata.
        power (float | None): Objective power for slides without metadata.
        max_patches (int | None): Keep at most this many patches per slide, evenly
            spaced over the tissue patches in reading order (deterministic).
        instance_labels (str | None): Folder of ``<slide_id>_mask.png`` masks or
            ``<slide_id>.geojson`` polygons (level-0 pixels) giving instance labels
            (evaluation only); a negative slide without a file has only negatives.
        min_overlap (float): A patch is positive when at least this fraction of its
            level-0 footprint is inside the positive region.
        patient_column (str): Patient column of the labels CSV (``case_id`` also
            accepted for the default).
        time_column (str): Survival time column (read when present).
        event_column (str): Survival event column (0/1).
        target_column (str): Regression target column (read when present).
    """

    def __init__(
        self,
        slides: str | list[str],
        labels_csv: str,
        *,
        resolution: float = 2.0,
        units: str = "mpp",
        patch_size: int = 32,
        stride: int | None = None,
        masker: str = "otsu",
        min_tissue: float = 0.5,
        mpp: float | None = None,
        power: float | None = None,
        max_patches: int | None = None,
        instance_labels: str | None = None,
        min_overlap: float = 0.5,
        patient_column: str = "patient_id",
        time_column: str = "time",
        event_column: str = "event",
        target_column: str = "target",
    ) -> None:
        self.cohort_columns = {
            "patient_column": patient_column,
            "time_column": time_column,
            "event_column": event_column,
            "target_column": target_column,
        }
        from tiahnm.slides.tiling import TilingConfig

        self.slides = [slides] if isinstance(slides, str) else list(slides)
        self.labels_csv = labels_csv
        self.tiling = TilingConfig(
            resolution=resolution,
            units=units,
            patch_size=patch_size,
            stride=stride,
            masker=masker,
            min_tissue=min_tissue,
        )
        self.mpp, self.power = mpp, power
        if max_patches is not None and max_patches < 1:
            msg = f"data.options.max_patches must be >= 1, got {max_patches}."
            raise DataError(msg)
        self.max_patches = max_patches
        self.instance_labels = check_instance_options(instance_labels, min_overlap)
        self.min_overlap = float(min_overlap)
        self.failures: list[tuple[str, str]] = []

    def load(self) -> list[Bag]:
        """Tile and read every labelled slide; unreadable ones are skipped."""
        from tiahnm.data.cohort import apply_cohort, read_cohort_columns
        from tiahnm.slides.reader import find_slides, slide_id

        labels, _, names = read_labels_csv(
            self.labels_csv,
            label_fallback=(
                self.cohort_columns["event_column"],
                self.cohort_columns["target_column"],
            ),
        )
        cohort = read_cohort_columns(self.labels_csv, **self.cohort_columns)
        bags, self.failures = [], []
        tissue, capped = [], []
        for path in find_slides(self.slides):
            sid = slide_id(path)
            if sid not in labels:
                logger.warning("%s: no label in %s; skipped.", path, self.labels_csv)
                continue
            try:
                bag = self._bag(path, sid, labels[sid])
                bag.meta["class_name"] = names[labels[sid]]
                bags.append(apply_cohort(bag, cohort, sid, self.labels_csv))
                meta = bag.meta
                tissue.append(
                    (sid, meta["n_grid"] - meta["n_tissue_patches"], meta["n_grid"])
                )
                capped.append(
                    (
                        sid,
                        meta["n_tissue_patches"] - bag.n_instances,
                        meta["n_tissue_patches"],
                    )
                )
            except InstanceLabelError:
                raise
            except DataError as exc:
                logger.warning("%s Skipped.", exc)
                self.failures.append((str(path), str(exc)))
        if not bags:
            detail = "; ".join(msg for _, msg in self.failures) or "no labelled slide"
            msg = f"data.options.slides: no slide could be loaded ({detail})."
            raise DataError(msg)
        log_dropped(
            "slide_patches", tissue, f"tissue fraction < {self.tiling.min_tissue}"
        )
        if self.max_patches is not None:
            log_dropped("slide_patches", capped, f"max_patches {self.max_patches}")
        return bags

    def _bag(self, path: Path, sid: str, label: int) -> Bag:
        from tiahnm.slides.dataset import SlidePatchDataset
        from tiahnm.slides.reader import close_reader, open_slide
        from tiahnm.slides.tiling import tile_slide

        cfg = self.tiling
        slide = open_slide(path, mpp=self.mpp, power=self.power, units=cfg.units)
        try:
            tiling = tile_slide(slide, cfg)
            keep = np.arange(len(tiling))
            if len(keep) == 0:
                msg = (
                    f"{path}: no patches with tissue fraction >= {cfg.min_tissue} "
                    f"(masker {cfg.masker})."
                )
                raise DataError(msg)
            if self.max_patches is not None and len(keep) > self.max_patches:
                keep = np.linspace(0, len(keep) - 1, self.max_patches).round()
                keep = np.unique(keep.astype(np.int64))
            dataset = SlidePatchDataset(
                slide.source,
                tiling.bounds[keep],
                cfg.resolution,
                cfg.units,
                reader=slide.reader,
            )
            try:
                patches = np.stack([dataset.read(i) for i in range(len(dataset))])
            except Exception as exc:
                msg = f"{path}: cannot read the slide's pixels ({type(exc).__name__}: {exc})."
                raise DataError(msg) from None
        finally:
            close_reader(slide.reader)
        inst = None
        if self.instance_labels is not None:
            inst = instance_labels_for(
                self.instance_labels,
                sid,
                label,
                tiling.coords[keep],
                tiling.patch_size_level0,
                tiling.dimensions,
                min_overlap=self.min_overlap,
                source=str(path),
            )
        p = cfg.patch_size
        chw = patches.transpose(0, 3, 1, 2).reshape(len(patches), -1)
        return Bag(
            slide_id=sid,
            label=label,
            features=torch.from_numpy(chw.astype(np.float32) / 255.0),
            coords=tiling.coords[keep],
            instance_labels=inst,
            source=str(path),
            meta={
                "image_shape": [3, p, p],
                "n_tissue_patches": len(tiling),
                "patch_size_level0": [float(v) for v in tiling.patch_size_level0],
                "n_grid": tiling.n_grid,
            },
        )


__all__ = ["SlidePatchBags"]
