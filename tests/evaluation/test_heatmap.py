import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tiahnm.cli import cli
from tiahnm.evaluation.heatmap import (
    render_heatmap,
    scale_scores,
    sqlite_store_compat,
)
from tiahnm.evaluation.scores import (
    SlideScores,
    read_instance_scores,
    write_instance_scores,
)

PATCH = 64


def grid_slide(meta=None) -> SlideScores:
    """A 4 x 3 grid of 64-px patches; even patches score 0.1, odd ones 0.9."""
    i = np.arange(12)
    coords = np.stack([(i % 4) * PATCH, (i // 4) * PATCH], axis=1)
    scores = np.where(i % 2 == 0, 0.1, 0.9).astype(np.float32)
    return SlideScores(
        slide_id="grid",
        scores=scores,
        coords=coords,
        instance_labels=(i % 2).astype(np.int8),
        label=1,
        probability=0.8,
        prediction=1,
        meta={"patch_size_level0": [PATCH, PATCH], **(meta or {})},
    )


def patch_centre(k: int, scale: float) -> tuple[int, int]:
    x, y = (k % 4) * PATCH + PATCH // 2, (k // 4) * PATCH + PATCH // 2
    return int(x * scale), int(y * scale)


def check_overlay(path, size, scale):
    img = Image.open(path)
    assert img.mode == "RGBA" and img.size == size
    alpha = np.asarray(img)[..., 3]
    for k in range(12):
        x, y = patch_centre(k, scale)
        if k % 2 == 0:
            assert alpha[y, x] == 0, k  # below the threshold: transparent
        else:
            assert alpha[y, x] == round(0.5 * 255), k


def test_heatmap_on_blank_background(tmp_path):
    slide = grid_slide({"level0_dimensions": [4 * PATCH, 3 * PATCH]})
    res = render_heatmap(slide, tmp_path, max_size=128, threshold=0.5)
    assert res.background == "blank"
    assert res.thumbnail_size == (128, 96)
    check_overlay(res.overlay, (128, 96), 0.5)
    with Image.open(res.png) as fig:
        assert fig.size[0] > 128 and fig.format == "PNG"


def test_heatmap_over_a_slide_image_with_geojson_and_store(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(100, 200, size=(3 * PATCH, 4 * PATCH, 3), dtype=np.uint8)
    slide_path = tmp_path / "grid.png"
    Image.fromarray(image).save(slide_path)
    slide = grid_slide({"slide_path": str(slide_path)})
    res = render_heatmap(
        slide,
        tmp_path / "out",
        max_size=128,
        kind="instance_prob",
        geojson=True,
        store=True,
    )
    assert res.background == "slide"
    assert res.thumbnail_size == (128, 96)  # TIAToolbox thumbnail at 0.5x
    check_overlay(res.overlay, (128, 96), 0.5)  # default: stored threshold 0.5
    doc = json.loads(res.geojson.read_text())
    assert len(doc["features"]) == 12
    first = doc["features"][1]
    assert first["properties"]["score"] == pytest.approx(0.9)
    assert first["geometry"]["coordinates"][0][2] == [2 * PATCH, PATCH]
    from tiatoolbox.annotation.storage import SQLiteStore

    with sqlite_store_compat():
        db = SQLiteStore(res.store)
        scores = sorted(a.properties["score"] for a in db.values())
        db.close()
    assert len(scores) == 12 and scores[-1] == pytest.approx(0.9)
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_scales():
    s = np.array([2.0, 4.0, 3.0, 10.0])
    values, mode, _ = scale_scores(s, "attention")
    assert mode == "minmax" and values.tolist() == [0.0, 0.25, 0.125, 1.0]
    values, mode, _ = scale_scores(s, "attention", "percentile")
    assert values.tolist() == pytest.approx([0.0, 2 / 3, 1 / 3, 1.0])
    values, mode, _ = scale_scores(np.array([0.2, 0.4]), "instance_prob")
    assert mode == "fixed" and values.tolist() == pytest.approx([0.2, 0.4])
    with pytest.raises(ValueError, match="scale must be"):
        scale_scores(s, None, "log")


def test_scores_file_round_trip(tmp_path):
    slide = grid_slide({"level0_dimensions": [256, 192]})
    slide.slide_id = "a/b%c"  # escaped group name
    path = write_instance_scores(tmp_path / "s.h5", [slide], {"score_kind": "x"})
    (back,), attrs = read_instance_scores(path)
    assert attrs["score_kind"] == "x"
    assert back.slide_id == "a/b%c" and back.label == 1
    assert np.array_equal(back.coords, slide.coords)
    assert back.meta["level0_dimensions"] == [256, 192]


def test_heatmap_cli_from_a_run(trained_run, tmp_path):
    out = tmp_path / "hm"
    res = CliRunner().invoke(
        cli,
        ["heatmap", str(trained_run.run), "--output-path", str(out), "--limit", "2"],
    )
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4  # 2 figures + 2 overlays
    # the first two slides of the first fold's scores
    slides, _ = read_instance_scores(
        trained_run.run / "folds" / "r0_f0" / "instance_scores.h5"
    )
    drawn = slides[:2]
    names = [f"{s.slide_id}{tail}.png" for s in drawn for tail in ("", "_overlay")]
    assert pngs == sorted(names)
    # on the slide's min-max scale, exactly the patches in the top half are painted
    res = CliRunner().invoke(
        cli,
        [
            "heatmap",
            str(trained_run.run),
            *("--output-path", str(tmp_path / "mm"), "--limit", "2"),
            *("--scale", "minmax", "--threshold", "0.5", "--alpha", "0.6"),
        ],
    )
    assert res.exit_code == 0, res.output
    for s in drawn:
        values = (s.scores - s.scores.min()) / (s.scores.max() - s.scores.min())
        img = np.asarray(Image.open(tmp_path / "mm" / f"{s.slide_id}_overlay.png"))
        scale = img.shape[1] / s.meta["level0_dimensions"][0]
        centres = ((s.coords + PATCH // 2) * scale).astype(int)
        alpha = img[centres[:, 1], centres[:, 0], 3]
        want = np.where(values >= 0.5, round(0.6 * 255), 0)
        assert alpha.tolist() == want.tolist(), s.slide_id
    res = CliRunner().invoke(
        cli,
        [
            "heatmap",
            str(trained_run.run),
            "--output-path",
            str(out),
            "--slide-id",
            "nope",
        ],
    )
    assert res.exit_code == 1 and "nope" in res.output
