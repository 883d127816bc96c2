"""Synthetic H&E-like slides with known tumour regions, for the built-in demo.

Each slide is a white background with one or more irregular tissue pieces: pink
stroma (eosin) with fibre-like streaks and scattered small purple nuclei
(haematoxylin), plus dense clusters of very small dark nuclei (lymphocyte aggregates)
in every slide as distractors. A tumour slide also has one to three elliptical tumour
regions: crowded, larger, darker and irregular nuclei. The tumour outlines are written
as GeoJSON polygons in level-0 pixels, which ``tiahnm extract`` turns into patch labels
(for instance-level metrics and heatmap outlines only; training never reads them).

Slides are written as tiled, JPEG-compressed pyramidal TIFFs (one page per level,
resolution tags in microns per pixel) that TIAToolbox opens with its OpenSlide reader.
Everything is drawn from one seed, so the same spec gives the same files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiahnm.utils.io import atomic_open, atomic_path

#: Colours (RGB) of the synthetic stains.
BACKGROUND = np.array([242, 241, 244], dtype=np.float32)
STROMA = np.array([232, 160, 196], dtype=np.float32)
STROMA_DARK = np.array([206, 118, 168], dtype=np.float32)
NUCLEUS = np.array([112, 76, 160], dtype=np.float32)
TUMOUR_NUCLEUS = np.array([72, 36, 118], dtype=np.float32)
LYMPHOCYTE = np.array([62, 40, 112], dtype=np.float32)


@dataclass(frozen=True)
class SlideSpec:
    """What one synthetic slide looks like.

    Attributes:
        slide_id (str): File stem.
        width (int): Level-0 width in pixels.
        height (int): Level-0 height in pixels.
        tumour (bool): Whether it has tumour regions (the slide label).
        seed (int): Seed of every random choice of this slide.
        mpp (float): Level-0 microns per pixel (written in the TIFF tags).
        levels (int): Pyramid levels (each half the size of the previous).
    """

    slide_id: str
    width: int
    height: int
    tumour: bool
    seed: int
    mpp: float = 1.0
    levels: int = 3


@dataclass
class DrawnSlide:
    """A drawn slide.

    Attributes:
        image (np.ndarray): ``[H, W, 3]`` uint8 RGB at level 0.
        tumour_regions (list[np.ndarray]): ``[K, 2]`` polygon rings (x, y) in
            level-0 pixels, closed (first point repeated at the end).
    """

    image: np.ndarray
    tumour_regions: list[np.ndarray]


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], cell: int
) -> np.ndarray:
    """Smooth noise in ``[0, 1]`` of ``shape``: random values every ``cell`` px."""
    from PIL import Image

    h, w = shape
    gh, gw = h // cell + 3, w // cell + 3
    coarse = rng.random((gh, gw)).astype(np.float32)
    fine = Image.fromarray(coarse, mode="F").resize(
        (gw * cell, gh * cell), Image.Resampling.BICUBIC
    )
    out = np.asarray(fine, dtype=np.float32)[cell : cell + h, cell : cell + w]
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _ellipse_ring(
    cx: float, cy: float, rx: float, ry: float, angle: float, wobble: np.ndarray
) -> np.ndarray:
    """A closed, slightly irregular elliptical ring of ``len(wobble)`` points."""
    t = np.linspace(0.0, 2.0 * math.pi, len(wobble), endpoint=False)
    r = 1.0 + wobble
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    ring = np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)
    return np.vstack([ring, ring[:1]])


def _polygon_mask(ring: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in ring.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _disks(max_radius: int) -> list[np.ndarray]:
    """Soft disk stamps (alpha in [0, 1]) of radius 0..max_radius."""
    out = []
    for r in range(max_radius + 1):
        yy, xx = np.mgrid[-r - 1 : r + 2, -r - 1 : r + 2]
        d = np.sqrt(xx**2 + yy**2)
        out.append(np.clip(r + 0.5 - d, 0.0, 1.0).astype(np.float32))
    return out


def _stamp(
    alpha: np.ndarray,
    colour_idx: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    kind: int,
    disks: list[np.ndarray],
) -> None:
    """Draw nuclei into ``alpha`` (max) and mark their colour kind."""
    h, w = alpha.shape
    for (x, y), r in zip(centres, radii, strict=True):
        disk = disks[int(r)]
        k = disk.shape[0] // 2
        x0, y0 = int(x) - k, int(y) - k
        x1, y1 = x0 + disk.shape[1], y0 + disk.shape[0]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        part = disk[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        region = alpha[cy0:cy1, cx0:cx1]
        stronger = part > region
        region[stronger] = part[stronger]
        colour_idx[cy0:cy1, cx0:cx1][stronger] = kind


def _points_in(
    rng: np.random.Generator, mask: np.ndarray, density: float
) -> np.ndarray:
    """Uniform random points inside ``mask``, ``density`` per pixel on average."""
    ys, xs = np.nonzero(mask)
    n = rng.poisson(density * len(xs)) if len(xs) else 0
    if n == 0:
        return np.zeros((0, 2), dtype=np.float64)
    pick = rng.integers(0, len(xs), size=n)
    jitter = rng.random((n, 2))
    return np.stack([xs[pick] + jitter[:, 0], ys[pick] + jitter[:, 1]], axis=1)


def draw_slide(spec: SlideSpec) -> DrawnSlide:
    """Draw one slide (see the module docstring); deterministic in ``spec.seed``."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(spec.seed)
    h, w = spec.height, spec.width
    scale = 1.0 / spec.mpp  # pixels per micron: sizes below are in microns
    # tissue: thresholded smooth noise, kept away from the borders
    field = _smooth_noise(rng, (h, w), max(8, int(min(h, w) / 5)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    edge = np.minimum.reduce([xx, yy, w - 1 - xx, h - 1 - yy]) / (0.12 * min(h, w))
    field = field * np.clip(edge, 0.0, 1.0)
    tissue = field > 0.42
    regions: list[np.ndarray] = []
    tumour = np.zeros((h, w), dtype=bool)
    if spec.tumour:
        ys, xs = np.nonzero(field > 0.6)
        if len(xs) == 0:
            ys, xs = np.nonzero(tissue)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(xs)))
            rx = float(rng.uniform(110, 230)) * scale
            ry = rx * float(rng.uniform(0.55, 1.0))
            wobble = gaussian_filter(rng.normal(0, 0.12, 48), 2.0, mode="wrap")
            ring = _ellipse_ring(
                float(xs[i]), float(ys[i]), rx, ry, rng.uniform(0, math.pi), wobble
            )
            ring[:, 0] = np.clip(ring[:, 0], 0, w - 1)
            ring[:, 1] = np.clip(ring[:, 1], 0, h - 1)
            regions.append(ring)
            tumour |= _polygon_mask(ring, (h, w))
        tissue |= tumour
    # stroma: eosin shades with fibre-like streaks
    fibres = _smooth_noise(rng, (h, w), max(4, int(24 * scale)))
    streaks = 0.5 + 0.5 * np.sin(
        (xx * math.cos(0.7) + yy * math.sin(0.7)) * (0.25 / scale) + 6.0 * fibres
    )
    mix = np.clip(0.55 * fibres + 0.45 * streaks, 0, 1)[..., None]
    img = STROMA * (1 - mix) + STROMA_DARK * mix
    # nuclei: scattered (normal), crowded large dark (tumour), lymphocyte clusters
    alpha = np.zeros((h, w), dtype=np.float32)
    kind = np.zeros((h, w), dtype=np.uint8)
    disks = _disks(math.ceil(8 * scale))
    normal_area = tissue & ~tumour
    pts = _points_in(rng, normal_area, 0.0022 / scale**2)
    radii = np.rint(rng.uniform(2.0, 3.2, len(pts)) * scale)
    _stamp(alpha, kind, pts, radii, 1, disks)
    lymph = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        ys, xs = np.nonzero(normal_area)
        if len(xs) == 0:
            break
        i = int(rng.integers(0, len(xs)))
        r = float(rng.uniform(35, 70)) * scale
        lymph |= (xx - xs[i]) ** 2 + (yy - ys[i]) ** 2 < r**2
    pts = _points_in(rng, lymph & normal_area, 0.012 / scale**2)
    _stamp(alpha, kind, pts, np.rint(np.full(len(pts), 1.8 * scale)), 3, disks)
    if spec.tumour:
        pts = _points_in(rng, tumour, 0.0075 / scale**2)
        radii = np.rint(rng.uniform(3.5, 6.5, len(pts)) * scale)
        _stamp(alpha, kind, pts, radii, 2, disks)
    colours = np.stack([STROMA, NUCLEUS, TUMOUR_NUCLEUS, LYMPHOCYTE])
    a = gaussian_filter(alpha, 0.6)[..., None] * 0.92
    img = img * (1 - a) + colours[kind] * a
    # soft tissue border, stain noise, white background
    t = gaussian_filter(tissue.astype(np.float32), 2.0 * scale)[..., None]
    img = img * t + BACKGROUND * (1 - t)
    img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)
    return DrawnSlide(image=image, tumour_regions=regions)


def write_pyramid_tiff(
    path: str | Path, image: np.ndarray, *, mpp: float, levels: int
) -> Path:
    """A tiled JPEG pyramid, one page per level, with resolution tags (atomically).

    Args:
        path (str | Path): Output ``.tif``.
        image (np.ndarray): ``[H, W, 3]`` uint8 level 0.
        mpp (float): Level-0 microns per pixel.
        levels (int): Number of levels (2x downsampling each).

    Returns:
        Path: The file.
    """
    import tifffile

    pyramid = [image]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        if min(h, w) < 2:
            break
        down = prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        pyramid.append(down.round().astype(np.uint8))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tif:
        for level, lv in enumerate(pyramid):
            res = 1e4 / (mpp * 2**level)  # pixels per centimetre
            tif.write(
                lv,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                subfiletype=0 if level == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
                description="tiahnm synthetic demo slide" if level == 0 else None,
            )
    return Path(path)


def write_annotation(path: str | Path, regions: list[np.ndarray]) -> Path:
    """The tumour regions as a GeoJSON FeatureCollection (level-0 pixels, atomically)."""
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[round(float(x), 1), round(float(y), 1)] for x, y in ring]
                ],
            },
            "properties": {"classification": {"name": "tumour"}},
        }
        for ring in regions
    ]
    doc = {"type": "FeatureCollection", "features": features}
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    return Path(path)


__all__ = [
    "DrawnSlide",
    "SlideSpec",
    "draw_slide",
    "write_annotation",
    "write_pyramid_tiff",
]
