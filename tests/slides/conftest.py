"""Synthetic pyramidal slides (BigTIFF, written with tifffile) for the slide tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SIZE = 1024
MPP = 0.5
#: Level-0 rectangle (x0, y0, x1, y1) of the synthetic tissue.
TISSUE = (256, 256, 768, 640)


def make_image(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """White-ish background with a noisy pink 'tissue' rectangle at :data:`TISSUE`."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 238, dtype=np.uint8)
    x0, y0, x1, y1 = TISSUE
    block = np.array([190, 110, 160], dtype=np.int16) + rng.integers(
        -25, 25, size=(y1 - y0, x1 - x0, 3)
    )
    img[y0:y1, x0:x1] = np.clip(block, 0, 255).astype(np.uint8)
    return img


def write_pyramid(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float | None = MPP,
    levels: int = 2,
    bigtiff: bool = True,
) -> Path:
    """A tiled pyramid, one IFD per level (the layout of notes 2.1)."""
    import tifffile

    pyramid = [image]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        pyramid.append(
            prev[:h, :w]
            .reshape(h // 2, 2, w // 2, 2, 3)
            .mean(axis=(1, 3))
            .astype(np.uint8)
        )
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, lv in enumerate(pyramid):
            extra = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**level)
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tif.write(
                lv,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                subfiletype=0 if level == 0 else 1,
                metadata=None,
                description="synthetic WSI" if level == 0 else None,
                **extra,
            )
    return path


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``syn_a.tif`` and ``syn_b.tif`` (BigTIFF, 1024 px, 2 levels, 0.5 mpp)."""
    root = tmp_path_factory.mktemp("slides")
    write_pyramid(root / "syn_a.tif", make_image(seed=0))
    write_pyramid(root / "syn_b.tif", make_image(seed=1))
    return root


@pytest.fixture(scope="session")
def nompp_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BigTIFF pyramid without resolution tags."""
    root = tmp_path_factory.mktemp("nompp")
    return write_pyramid(root / "syn_nompp.tif", make_image(seed=2), mpp=None)
