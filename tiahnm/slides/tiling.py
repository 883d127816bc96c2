"""Tissue masking and patch coordinates at a target resolution.

The grid is TIAToolbox's own (``PatchExtractor.get_coordinates`` on
``reader.slide_dimensions(resolution, units)``, patches that run over the edge kept
and padded), so the patches are exactly those TIAToolbox's ``WSIPatchDataset`` and
``DeepFeatureExtractor`` read. Two coordinate systems are involved:

* ``bounds`` ``[N, 4]`` (x0, y0, x1, y1): in the pixel space of the requested
  resolution, as TIAToolbox's extractors return them; used to read the patches
  (``read_bounds(..., coord_space="resolution")``).
* ``coords`` ``[N, 2]`` (x, y): the top-left corner in **level-0 (baseline) pixels**,
  ``round(bounds[:, :2] / scale)`` with ``scale`` the read pixels per level-0 pixel.
  This is what feature files store (CLAM/TRIDENT convention). A patch covers
  ``patch_size / scale`` level-0 pixels (``patch_size_level0``).

The tissue mask comes from TIAToolbox's maskers (``OtsuTissueMasker``,
``MorphologicalMasker``) applied to a thumbnail; a patch is kept when the fraction
of its area (out-of-slide padding counts as background) that is tissue is at least
``min_tissue``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tiahnm.errors import ConfigError, DataError
from tiahnm.slides.reader import UNITS, OpenedSlide

logger = logging.getLogger(__name__)

MASKERS = ("otsu", "morphological", "none")
#: Default mask resolution when the patch does not ask for a finer one (microns/px).
DEFAULT_MASK_MPP = 8.0
#: The mask is made fine enough for a patch to span this many mask pixels ...
MASK_PIXELS_PER_PATCH = 16
#: ... but never larger than this many pixels on its longest side.
MAX_MASK_SIDE = 4096


@dataclass(frozen=True)
class TilingConfig:
    """Where patches are cut.

    Attributes:
        resolution (float): Target resolution, in ``units``.
        units (str): ``"mpp"``, ``"power"`` or ``"baseline"`` (TIAToolbox names).
        patch_size (int): Patch side in pixels at the target resolution.
        stride (int | None): Step between patches (default ``patch_size``).
        masker (str): ``"otsu"``, ``"morphological"`` or ``"none"``.
        min_tissue (float): Minimum tissue fraction of a kept patch (0-1). With
            ``masker="none"`` every patch is kept.
        mask_mpp (float | None): Resolution of the mask in microns per pixel (default:
            8, or finer so that a patch spans at least 16 mask pixels).
        masker_options (dict): Extra keyword arguments of the TIAToolbox masker
            (e.g. ``kernel_size``, ``min_region_size`` for ``morphological``).
    """

    resolution: float = 0.5
    units: str = "mpp"
    patch_size: int = 224
    stride: int | None = None
    masker: str = "otsu"
    min_tissue: float = 0.5
    mask_mpp: float | None = None
    masker_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.units not in UNITS:
            msg = f"--units must be one of {', '.join(UNITS)}, got {self.units!r}."
            raise ConfigError(msg)
        if not self.resolution > 0:
            msg = f"--resolution must be positive, got {self.resolution}."
            raise ConfigError(msg)
        if self.patch_size < 1:
            msg = f"--patch-size must be positive, got {self.patch_size}."
            raise ConfigError(msg)
        if self.stride is not None and self.stride < 1:
            msg = f"--stride must be positive, got {self.stride}."
            raise ConfigError(msg)
        if self.masker not in MASKERS:
            msg = f"--masker must be one of {', '.join(MASKERS)}, got {self.masker!r}."
            raise ConfigError(msg)
        if not 0.0 <= self.min_tissue <= 1.0:
            msg = f"--min-tissue must be within [0, 1], got {self.min_tissue}."
            raise ConfigError(msg)
        if self.mask_mpp is not None and not self.mask_mpp > 0:
            msg = f"--mask-mpp must be positive, got {self.mask_mpp}."
            raise ConfigError(msg)

    @property
    def step(self) -> int:
        """The stride in effect."""
        return self.stride or self.patch_size

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly settings."""
        out = asdict(self)
        out["stride"] = self.step
        out["masker_options"] = dict(self.masker_options)
        return out


@dataclass
class Tiling:
    """Patches of one slide.

    Attributes:
        bounds (np.ndarray): ``[N, 4]`` int, (x0, y0, x1, y1) at the target resolution.
        coords (np.ndarray): ``[N, 2]`` int64, top-left corners in level-0 pixels.
        tissue_fraction (np.ndarray): ``[N]`` float32 tissue fraction (1 without mask).
        scale (tuple[float, float]): Target-resolution pixels per level-0 pixel (x, y).
        patch_size_level0 (tuple[float, float]): Patch footprint in level-0 pixels.
        dimensions (tuple[int, int]): Level-0 (width, height).
        dimensions_at_resolution (tuple[int, int]): (width, height) at the target.
        n_grid (int): Patches in the full grid before masking.
        mask (np.ndarray | None): The tissue mask (bool, thumbnail resolution).
        mask_scale (float): Mask pixels per level-0 pixel.
    """

    bounds: np.ndarray
    coords: np.ndarray
    tissue_fraction: np.ndarray
    scale: tuple[float, float]
    patch_size_level0: tuple[float, float]
    dimensions: tuple[int, int]
    dimensions_at_resolution: tuple[int, int]
    n_grid: int
    mask: np.ndarray | None = None
    mask_scale: float = 0.0

    def __len__(self) -> int:
        return int(self.bounds.shape[0])


def read_scale(
    slide: OpenedSlide, resolution: float, units: str
) -> tuple[float, float]:
    """Pixels at ``resolution``/``units`` per level-0 pixel, per axis."""
    if units == "baseline":
        return (float(resolution), float(resolution))
    if units == "mpp":
        mpp = np.asarray(slide.reader.info.mpp, dtype=float).reshape(-1)
        if mpp.size == 1:
            mpp = np.repeat(mpp, 2)
        return (float(mpp[0] / resolution), float(mpp[1] / resolution))
    if units == "power":
        power = float(slide.reader.info.objective_power)
        return (resolution / power, resolution / power)
    msg = f"units must be one of {', '.join(UNITS)}, got {units!r}."
    raise ConfigError(msg)


def mask_scale_for(slide: OpenedSlide, cfg: TilingConfig, patch_level0: float) -> float:
    """Mask pixels per level-0 pixel (see :class:`TilingConfig` ``mask_mpp``)."""
    longest = max(slide.dimensions)
    if cfg.mask_mpp is not None:
        if slide.mpp is None:
            msg = f"{slide.path}: --mask-mpp needs the slide's mpp (give --mpp)."
            raise DataError(msg)
        scale = slide.mpp / cfg.mask_mpp
    else:
        if slide.mpp is not None:
            scale = slide.mpp / DEFAULT_MASK_MPP
        elif slide.power is not None:
            scale = 1.25 / slide.power
        else:
            scale = 1.0 / 32.0
        scale = max(scale, MASK_PIXELS_PER_PATCH / max(patch_level0, 1.0))
    return float(min(scale, 1.0, MAX_MASK_SIDE / max(longest, 1)))


def tissue_mask(
    slide: OpenedSlide, cfg: TilingConfig, mask_scale: float
) -> np.ndarray | None:
    """A boolean tissue mask of the whole slide at ``mask_scale`` (None: no masker).

    The thumbnail is read with ``reader.slide_thumbnail(mask_scale, "baseline")`` and
    given to TIAToolbox's ``OtsuTissueMasker`` or ``MorphologicalMasker`` (whose
    kernel is sized from the mask's microns per pixel, or objective power).
    """
    if cfg.masker == "none":
        return None
    from tiatoolbox.tools import tissuemask

    try:
        thumb = np.asarray(slide.reader.slide_thumbnail(mask_scale, "baseline"))
    except Exception as exc:  # any decoder failure: the pixel data is bad
        msg = (
            f"{slide.path}: cannot read the slide's pixels (truncated or corrupt "
            f"file?) ({type(exc).__name__}: {exc})."
        )
        raise DataError(msg) from None
    if thumb.ndim == 2:
        thumb = np.repeat(thumb[..., None], 3, axis=-1)
    thumb = np.ascontiguousarray(thumb[..., :3])
    options = dict(cfg.masker_options)
    try:
        if cfg.masker == "otsu":
            masker: Any = tissuemask.OtsuTissueMasker(**options)
        else:
            if "kernel_size" not in options:
                if slide.mpp is not None:
                    options.setdefault("mpp", slide.mpp / mask_scale)
                elif slide.power is not None:
                    options.setdefault("power", slide.power * mask_scale)
            masker = tissuemask.MorphologicalMasker(**options)
    except (TypeError, ValueError) as exc:
        msg = f"--masker {cfg.masker}: bad masker options {options}: {exc}"
        raise ConfigError(msg) from None
    return np.asarray(masker.fit_transform([thumb])[0], dtype=bool)


def patch_fractions(
    mask: np.ndarray,
    boxes_level0: np.ndarray,
    dimensions: tuple[int, int],
) -> np.ndarray:
    """Fraction of each level-0 box covered by ``mask`` (outside the slide: 0).

    Args:
        mask (np.ndarray): ``[h, w]`` bool/0-1 mask covering the whole slide.
        boxes_level0 (np.ndarray): ``[N, 4]`` (x0, y0, x1, y1) in level-0 pixels.
        dimensions (tuple[int, int]): Level-0 (width, height) the mask covers.

    Returns:
        np.ndarray: ``[N]`` float32 in [0, 1] (an integral image; exact on mask pixels).
    """
    h, w = mask.shape[:2]
    sx, sy = w / dimensions[0], h / dimensions[1]
    integral = np.zeros((h + 1, w + 1), dtype=np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)
    b = np.asarray(boxes_level0, dtype=np.float64)
    x0 = np.clip(np.floor(b[:, 0] * sx), 0, w).astype(np.int64)
    x1 = np.clip(np.ceil(b[:, 2] * sx), 0, w).astype(np.int64)
    y0 = np.clip(np.floor(b[:, 1] * sy), 0, h).astype(np.int64)
    y1 = np.clip(np.ceil(b[:, 3] * sy), 0, h).astype(np.int64)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    covered = (x1 - x0) * (y1 - y0)  # mask pixels of the part inside the slide
    density = np.where(covered > 0, inside / np.maximum(covered, 1), 0.0)
    # the part of the footprint inside the slide; padding beyond the edge is background
    inside_share = np.clip(
        (np.minimum(b[:, 2], dimensions[0]) - np.maximum(b[:, 0], 0))
        / np.maximum(b[:, 2] - b[:, 0], 1e-9),
        0,
        1,
    ) * np.clip(
        (np.minimum(b[:, 3], dimensions[1]) - np.maximum(b[:, 1], 0))
        / np.maximum(b[:, 3] - b[:, 1], 1e-9),
        0,
        1,
    )
    return np.clip(density * inside_share, 0.0, 1.0).astype(np.float32)


def tile_slide(slide: OpenedSlide, cfg: TilingConfig) -> Tiling:
    """Grid, mask and keep the patches of one slide.

    Args:
        slide (OpenedSlide): From :func:`tiahnm.slides.reader.open_slide`.
        cfg (TilingConfig): Resolution, patch size, stride, masker.

    Returns:
        Tiling: Kept patches (may be empty), in row-major grid order.
    """
    from tiatoolbox.tools.patchextraction import PatchExtractor

    reader = slide.reader
    scale = read_scale(slide, cfg.resolution, cfg.units)
    if max(scale) > 1.0 + 1e-3:
        logger.warning(
            "%s: %s %s is finer than the slide's level 0 (x%.2f): patches are upsampled.",
            slide.path.name,
            cfg.resolution,
            cfg.units,
            max(scale),
        )
    dims_res = tuple(int(v) for v in reader.slide_dimensions(cfg.resolution, cfg.units))
    if min(dims_res) < 1:
        msg = f"{slide.path}: empty at {cfg.resolution} {cfg.units}."
        raise DataError(msg)
    if cfg.patch_size > min(dims_res):
        msg = (
            f"{slide.path}: patch size {cfg.patch_size} px is larger than the slide "
            f"({dims_res[0]} x {dims_res[1]} px at {cfg.resolution} {cfg.units}); "
            "lower --patch-size or use a finer --resolution."
        )
        raise DataError(msg)
    bounds = PatchExtractor.get_coordinates(
        image_shape=dims_res,
        patch_input_shape=(cfg.patch_size, cfg.patch_size),
        stride_shape=(cfg.step, cfg.step),
    ).astype(np.int64)
    n_grid = int(bounds.shape[0])
    sx, sy = scale
    boxes0 = bounds.astype(np.float64) / np.array([sx, sy, sx, sy])
    patch0 = (cfg.patch_size / sx, cfg.patch_size / sy)
    mask_scale = mask_scale_for(slide, cfg, min(patch0))
    mask = tissue_mask(slide, cfg, mask_scale)
    if mask is None:
        fraction = np.ones(n_grid, dtype=np.float32)
        keep = np.ones(n_grid, dtype=bool)
    else:
        fraction = patch_fractions(mask, boxes0, slide.dimensions)
        keep = (fraction >= cfg.min_tissue) & (fraction > 0)
    coords = np.rint(boxes0[:, :2]).astype(np.int64)
    return Tiling(
        bounds=bounds[keep],
        coords=coords[keep],
        tissue_fraction=fraction[keep],
        scale=(sx, sy),
        patch_size_level0=patch0,
        dimensions=slide.dimensions,
        dimensions_at_resolution=(dims_res[0], dims_res[1]),
        n_grid=n_grid,
        mask=mask,
        mask_scale=mask_scale,
    )
