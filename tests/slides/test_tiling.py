from __future__ import annotations

import numpy as np
import pytest

from tests.slides.conftest import TISSUE
from tiahnm.errors import ConfigError
from tiahnm.slides.dataset import SlidePatchDataset
from tiahnm.slides.reader import open_slide
from tiahnm.slides.tiling import TilingConfig, patch_fractions, tile_slide


@pytest.fixture
def slide_a(slide_dir):
    slide = open_slide(slide_dir / "syn_a.tif")
    yield slide
    slide.close()


@pytest.mark.parametrize(
    ("resolution", "patch", "stride", "expected"),
    [
        (0.5, 256, None, 16),  # 1024 px at 0.5 mpp: 4 x 4
        (1.0, 256, None, 4),  # 512 px at 1.0 mpp: 2 x 2
        (1.0, 128, None, 16),
        (1.0, 256, 128, 16),  # starts 0,128,256,384 on each axis
        (2.0, 100, None, 9),  # 256 px: ceil(256/100) = 3 (edge patches padded)
    ],
)
def test_grid_counts(slide_a, resolution, patch, stride, expected):
    cfg = TilingConfig(
        resolution=resolution, patch_size=patch, stride=stride, masker="none"
    )
    tiling = tile_slide(slide_a, cfg)
    assert len(tiling) == tiling.n_grid == expected


def test_coords_are_level0(slide_a):
    tiling = tile_slide(
        slide_a, TilingConfig(resolution=1.0, patch_size=128, masker="none")
    )
    assert tiling.scale == pytest.approx((0.5, 0.5))
    assert tiling.patch_size_level0 == pytest.approx((256.0, 256.0))
    # bounds at 1.0 mpp step by 128; level-0 coords by 256
    np.testing.assert_array_equal(tiling.coords, tiling.bounds[:, :2] * 2)
    assert set(tiling.coords[:, 0]) == {0, 256, 512, 768}
    # the pixels read for a patch are those at its level-0 location
    ds = SlidePatchDataset(slide_a.source, tiling.bounds, 1.0, "mpp")
    i = int(np.flatnonzero((tiling.coords == [256, 256]).all(axis=1))[0])
    patch = ds.read(i).astype(float)
    direct = slide_a.reader.read_rect(
        (256, 256), (128, 128), resolution=1.0, units="mpp", coord_space="baseline"
    ).astype(float)
    assert patch.shape == (128, 128, 3)
    assert np.abs(patch - direct).mean() < 3.0


def test_otsu_keeps_tissue_patches(slide_a):
    cfg = TilingConfig(resolution=0.5, patch_size=128, masker="otsu", min_tissue=0.5)
    tiling = tile_slide(slide_a, cfg)
    x0, y0, x1, y1 = TISSUE  # 512 x 384 level-0 px = 4 x 3 patches of 128
    assert len(tiling) == 12
    assert (tiling.coords[:, 0] >= x0).all() and (tiling.coords[:, 0] < x1).all()
    assert (tiling.coords[:, 1] >= y0).all() and (tiling.coords[:, 1] < y1).all()
    assert (tiling.tissue_fraction >= 0.5).all()
    morph = tile_slide(
        slide_a,
        TilingConfig(resolution=0.5, patch_size=128, masker="morphological"),
    )
    assert len(morph) >= 12  # dilation only adds border patches
    looser = tile_slide(
        slide_a, TilingConfig(resolution=0.5, patch_size=128, min_tissue=0.0)
    )
    assert len(looser) >= len(tiling)


def test_patch_fractions_counts_padding_as_background():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True  # left half of a 100 x 100 slide
    boxes = np.array(
        [[0, 0, 50, 50], [25, 0, 75, 50], [50, 0, 100, 50], [0, 80, 40, 120]],
        dtype=float,
    )
    frac = patch_fractions(mask, boxes, (100, 100))
    np.testing.assert_allclose(frac, [1.0, 0.5, 0.0, 0.5], atol=1e-6)


def test_bad_settings():
    with pytest.raises(ConfigError, match="--units"):
        TilingConfig(units="level")
    with pytest.raises(ConfigError, match="--min-tissue"):
        TilingConfig(min_tissue=1.5)
    with pytest.raises(ConfigError, match="--masker"):
        TilingConfig(masker="kmeans")


@pytest.mark.shared_data
def test_real_slide_counts(shared_data):
    slide = open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs")
    try:
        full = tile_slide(slide, TilingConfig(resolution=0.5, masker="none"))
        assert full.n_grid == len(full) == 10 * 14  # 2216 x 2961 px at 0.5 mpp
        assert full.coords.max(axis=0).tolist() < [2220, 2967]
        masked = tile_slide(slide, TilingConfig(resolution=0.5))
        assert 0 < len(masked) < full.n_grid
    finally:
        slide.close()
    tcga = open_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.25)
    try:  # 4443 x 3567 at 0.25 mpp given -> 1.0 mpp: 1111 x 892 -> 5 x 4 of 224
        tiling = tile_slide(tcga, TilingConfig(resolution=1.0, masker="none"))
        assert len(tiling) == 20
        assert tiling.coords[:, 0].max() == 4 * 896
    finally:
        tcga.close()
