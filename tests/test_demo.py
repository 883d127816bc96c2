"""The built-in demo end to end through the CLI (its quick size), run twice."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tiahnm.cli import cli
from tiahnm.demo import SIZES, make_demo_data
from tiahnm.demo.data import DemoDataSpec
from tiahnm.demo.slides import SlideSpec, draw_slide
from tiahnm.errors import ConfigError


def test_quick_demo_runs_then_skips_every_stage(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        cli, ["run", "--demo", "--quick", "--output-path", str(out)]
    )
    assert res.exit_code == 0, res.output
    for stage in ("extract", "train", "heatmaps", "report"):
        assert re.search(rf"^\[{stage}\] done in [0-9.]+ s", res.output, re.M), stage
    report = Path(re.search(r"^Report: (.+)$", res.output, re.M).group(1))
    assert report == out.resolve() / "report.md"
    assert report.is_file()
    text = report.read_text()
    assert "![demo_00](heatmaps/demo_00.png)" in text
    assert "## Instance-level test metrics" in text
    maps = sorted(p.name for p in (out / "heatmaps").glob("demo_??.png"))
    assert len(maps) == 2
    assert maps[0].startswith("demo_")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_folds"] == 2
    assert summary["head"] == "abmil"
    assert summary["miner"] == "mhim"
    assert {"auc", "accuracy", "instance_auc"} <= set(summary["metrics"])
    assert sorted(p.stem for p in (out / "features").glob("*.h5")) == [
        f"demo_{i:02d}" for i in range(4)
    ]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [
        stages[s]["status"] for s in ("extract", "train", "heatmaps", "report")
    ] == ["done"] * 4
    feature_mtime = (out / "features" / "demo_00.h5").stat().st_mtime_ns
    report_mtime = report.stat().st_mtime_ns

    # `tiahnm run` without CONFIG is the demo too; everything is already done
    again = CliRunner().invoke(cli, ["run", "--quick", "--output-path", str(out)])
    assert again.exit_code == 0, again.output
    assert "[data] skipped (synthetic slides already there)" in again.output
    for stage in ("extract", "train", "heatmaps", "report"):
        assert f"[{stage}] skipped (done with the same settings)" in again.output
    assert f"Report: {report}" in again.output
    assert (out / "features" / "demo_00.h5").stat().st_mtime_ns == feature_mtime
    assert report.stat().st_mtime_ns == report_mtime
    assert json.loads((out / "summary.json").read_text()) == summary


def test_demo_refuses_a_folder_made_with_another_size(tmp_path):
    make_demo_data(tmp_path, DemoDataSpec(n_slides=4, width=512, height=512))
    with pytest.raises(ConfigError, match=r"data\.json: this folder holds a demo"):
        make_demo_data(tmp_path, DemoDataSpec(n_slides=6, width=512, height=512))


def test_demo_data_is_deterministic_and_labelled(tmp_path):
    spec = DemoDataSpec(n_slides=4, width=512, height=512, seed=3)
    data = make_demo_data(tmp_path / "a", spec)
    assert data.generated
    assert data.labels_csv.read_text().splitlines() == [
        "slide_id,label",
        "demo_00,normal",
        "demo_01,tumour",
        "demo_02,normal",
        "demo_03,tumour",
    ]
    normal = json.loads((data.annotations_dir / "demo_00.geojson").read_text())
    tumour = json.loads((data.annotations_dir / "demo_01.geojson").read_text())
    assert normal["features"] == []
    assert 1 <= len(tumour["features"]) <= 3
    again = make_demo_data(tmp_path / "a", spec)
    assert not again.generated
    other = make_demo_data(tmp_path / "b", spec)
    for name in ("demo_01.tif", "demo_02.tif"):
        assert (data.slides_dir / name).read_bytes() == (
            other.slides_dir / name
        ).read_bytes()


def test_tumour_regions_are_darker_and_inside_the_slide():
    drawn = draw_slide(SlideSpec("t", 768, 640, tumour=True, seed=5))
    assert drawn.image.shape == (640, 768, 3)
    assert drawn.image.dtype == np.uint8
    assert drawn.tumour_regions
    from tiahnm.demo.slides import _polygon_mask

    inside = np.zeros((640, 768), dtype=bool)
    for ring in drawn.tumour_regions:
        assert np.array_equal(ring[0], ring[-1])  # closed
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 767
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= 639
        inside |= _polygon_mask(ring, (640, 768))
    grey = drawn.image.mean(axis=2)
    tissue = grey < 225
    assert grey[inside].mean() < grey[tissue & ~inside].mean() - 15
    normal = draw_slide(SlideSpec("n", 768, 640, tumour=False, seed=5))
    assert normal.tumour_regions == []


def test_demo_sizes_keep_the_quick_one_small():
    assert SIZES["quick"].n_slides < SIZES["full"].n_slides
    assert SIZES["full"].n_slides >= 8
