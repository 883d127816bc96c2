from __future__ import annotations

import numpy as np
import pytest

from tests.slides.conftest import make_image, write_pyramid
from tiahnm.errors import DataError
from tiahnm.slides.reader import find_slides, open_slide


def test_bigtiff_pyramid_opens_with_metadata(slide_dir):
    slide = open_slide(slide_dir / "syn_a.tif")
    try:
        assert type(slide.reader).__name__ == "TIFFWSIReader"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.mpp_source == "metadata"
        assert slide.dimensions == (1024, 1024)
        assert slide.reader.info.level_count == 2
    finally:
        slide.close()


def test_classic_tiff_falls_back_to_openslide(tmp_path):
    # WSIReader.open gives a VirtualWSIReader without mpp for this layout (notes 2.2)
    path = write_pyramid(tmp_path / "classic.tif", make_image(), bigtiff=False)
    slide = open_slide(path)
    try:
        assert type(slide.reader).__name__ == "OpenSlideWSIReader"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.reader.info.level_count == 2
    finally:
        slide.close()


def test_missing_mpp_names_file_unless_given(nompp_slide):
    with pytest.raises(DataError, match=r"syn_nompp\.tif.*--mpp"):
        open_slide(nompp_slide)
    slide = open_slide(nompp_slide, mpp=0.5)
    assert slide.mpp == 0.5 and slide.mpp_source == "user"
    slide.close()
    # baseline units need no physical scale
    open_slide(nompp_slide, units="baseline").close()
    with pytest.raises(DataError, match=r"syn_nompp\.tif.*--power"):
        open_slide(nompp_slide, units="power")


def test_metadata_mpp_is_not_overridden(slide_dir):
    slide = open_slide(slide_dir / "syn_a.tif", mpp=0.25)
    assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata"
    assert slide.notes and "ignored" in slide.notes[0]
    slide.close()


def test_corrupt_file_is_a_data_error(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=r"broken\.svs: cannot open"):
        open_slide(bad)
    with pytest.raises(DataError, match="not found"):
        open_slide(tmp_path / "absent.svs")


def test_png_needs_mpp(tmp_path):
    from PIL import Image

    path = tmp_path / "tile.png"
    Image.fromarray(make_image()[200:456, 200:456]).save(path)
    with pytest.raises(DataError, match=r"tile\.png: no resolution metadata.*image"):
        open_slide(path)
    slide = open_slide(path, mpp=0.5)
    assert type(slide.reader).__name__ == "VirtualWSIReader"
    assert slide.dimensions == (256, 256) and slide.mpp == 0.5


def test_find_slides(slide_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    found = find_slides([slide_dir, slide_dir / "syn_a.tif"])
    assert [p.name for p in found] == ["syn_a.tif", "syn_b.tif"]
    with pytest.raises(DataError, match="no such file"):
        find_slides([tmp_path / "nope"])


@pytest.mark.shared_data
def test_real_slides_scale(shared_data):
    cmu = open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs")
    assert cmu.mpp == pytest.approx(0.499) and cmu.dimensions == (2220, 2967)
    cmu.close()
    tcga = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(DataError, match=r"tcga-cr-7395-01a-01-ts1\.svs: no resolution"):
        open_slide(tcga)
    slide = open_slide(tcga, mpp=0.25)
    assert slide.mpp_source == "user" and slide.dimensions == (4443, 3567)
    slide.close()
