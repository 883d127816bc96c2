"""Slide pixels for the HTML report: a Deep Zoom (DZI) tile pyramid and patch crops.

Both read the slide through TIAToolbox (``WSIReader``, baseline units, so slides
without resolution metadata work). The pyramid is pre-rendered into the report
folder, so the viewer works from ``file://`` with no server; its long side is bounded
(``max_size`` pixels), which bounds the folder's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class DeepZoom:
    """A written DZI pyramid.

    Attributes:
        folder (Path): ``<name>_files`` holding ``<level>/<col>_<row>.jpg``.
        width (int): Width of the top level (pixels).
        height (int): Height of the top level.
        level0 (tuple[int, int]): The slide's level-0 ``(width, height)``.
        tile_size (int): Tile side without overlap.
        overlap (int): Overlap in pixels.
        n_tiles (int): Tiles written.
    """

    folder: Path
    width: int
    height: int
    level0: tuple[int, int]
    tile_size: int
    overlap: int
    n_tiles: int

    def tile_source(self, base: Path) -> dict[str, Any]:
        """OpenSeadragon's inline DZI description (no XML fetch: works on file://)."""
        return {
            "Image": {
                "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                "Url": self.folder.relative_to(base).as_posix() + "/",
                "Format": "jpg",
                "Overlap": str(self.overlap),
                "TileSize": str(self.tile_size),
                "Size": {"Width": str(self.width), "Height": str(self.height)},
            }
        }


def read_slide_image(path: str | Path, max_size: int) -> tuple[np.ndarray, tuple]:
    """The slide as RGB uint8, at most ``max_size`` a side, and its level-0 size."""
    from tiahnm.evaluation.heatmap import read_thumbnail

    return read_thumbnail(path, max_size)


def write_deep_zoom(
    image: np.ndarray,
    level0: tuple[int, int],
    folder: str | Path,
    *,
    tile_size: int = 254,
    overlap: int = 1,
    quality: int = 80,
) -> DeepZoom:
    """Write ``image`` as a DZI pyramid (levels 0..ceil(log2(max side))).

    Args:
        image (np.ndarray): ``[h, w, 3]`` uint8, the top level.
        level0 (tuple[int, int]): The slide's level-0 ``(width, height)``.
        folder (str | Path): The ``<name>_files`` folder (replaced).
        tile_size (int): Tile side.
        overlap (int): Pixels shared with each neighbour.
        quality (int): JPEG quality.

    Returns:
        DeepZoom: What was written.
    """
    import shutil

    from PIL import Image

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    height, width = image.shape[:2]
    top = max(0, math.ceil(math.log2(max(width, height, 1))))
    level_img = Image.fromarray(image[..., :3])
    n_tiles = 0
    for level in range(top, -1, -1):
        w, h = level_img.size
        out = folder / str(level)
        out.mkdir(parents=True)
        for col in range(math.ceil(w / tile_size)):
            for row in range(math.ceil(h / tile_size)):
                x0 = max(col * tile_size - overlap, 0)
                y0 = max(row * tile_size - overlap, 0)
                x1 = min((col + 1) * tile_size + overlap, w)
                y1 = min((row + 1) * tile_size + overlap, h)
                tile = level_img.crop((x0, y0, x1, y1))
                tile.save(out / f"{col}_{row}.jpg", quality=quality)
                n_tiles += 1
        if level:
            size = (max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2)))
            level_img = level_img.resize(size, Image.Resampling.BOX)
    return DeepZoom(folder, width, height, level0, tile_size, overlap, n_tiles)


def read_patches(
    path: str | Path,
    coords: Sequence[Sequence[float]],
    size_level0: tuple[float, float],
    out_px: int = 96,
) -> list[np.ndarray]:
    """Patches of a slide at level-0 ``coords`` (top-left), resized to ``out_px``.

    Read with TIAToolbox's ``read_bounds`` in baseline units at the resolution that
    gives ``out_px`` pixels (no full-resolution read for large patches).
    """
    from PIL import Image

    from tiahnm.slides.reader import open_slide

    pw, ph = size_level0
    scale = min(1.0, out_px / max(pw, ph))
    slide = open_slide(path, units="baseline")
    crops = []
    try:
        for x, y in coords:
            bounds = (int(x), int(y), round(x + pw), round(y + ph))
            img = np.asarray(
                slide.reader.read_bounds(bounds, resolution=scale, units="baseline")
            )[..., :3]
            pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
            crops.append(np.asarray(pil.resize((out_px, out_px))))
    finally:
        slide.close()
    return crops


__all__ = ["DeepZoom", "read_patches", "read_slide_image", "write_deep_zoom"]
