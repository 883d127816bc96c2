"""``tiahnm extract`` logs how many grid patches the tissue filter dropped."""

from __future__ import annotations

import logging
import shutil

from tiahnm.slides.extract import ExtractConfig, extract_features
from tiahnm.slides.tiling import TilingConfig


def test_tissue_filter_logs_per_slide_and_total(slide_dir, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slide_dir / "syn_a.tif", folder / "syn_a.tif")
    cfg = ExtractConfig(
        tiling=TilingConfig(resolution=1.0, units="mpp", patch_size=64), num_workers=0
    )
    with caplog.at_level(logging.INFO, logger="tiahnm"):
        summary = extract_features([folder], tmp_path / "out", cfg)
    result = summary.results[0]
    # 1024 level-0 px at 0.5 mpp = 512 px at 1 mpp: an 8 x 8 grid, 12 tissue patches
    assert (result.n_grid, result.n_patches) == (64, 12)
    assert "extract: syn_a: dropped 52 of 64 patches (tissue fraction < 0.5)" in (
        caplog.text
    )
    assert "extract: dropped 52 of 64 patches (81.2%" in caplog.text
