"""report.html: validation colour scale, DZI tiles, mined records, the page in Chromium."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.evaluation import browser
from tests.synthetic import make_bags
from tiahnm.cli import cli
from tiahnm.evaluation.heatmap import default_threshold, scale_scores
from tiahnm.evaluation.html_report import _grid
from tiahnm.evaluation.reference import (
    mean_reference,
    parse_reference,
    reference_range,
    validation_reference,
)
from tiahnm.evaluation.scores import SlideScores
from tiahnm.evaluation.tiles import write_deep_zoom
from tiahnm.miners.base import FitContext, Miner


def test_validation_reference_percentiles_and_scale():
    bags = make_bags(4, 2, min_n=50, max_n=50)  # labels 0, 1, 0, 1
    rng = np.random.default_rng(0)
    scores = [
        rng.uniform(0.4, 0.6, 50) if b.label == 0 else rng.uniform(0.5, 0.9, 50)
        for b in bags
    ]
    ref = validation_reference(bags, scores)
    neg = np.concatenate([scores[0], scores[2]])
    pos = np.concatenate([scores[1], scores[3]])
    assert ref["n_negative"] == 100 and ref["n_positive"] == 100
    assert ref["negative"][95] == pytest.approx(np.percentile(neg, 95), abs=1e-12)
    lo, hi = reference_range(ref)
    assert lo == neg.max()  # above every normal validation patch
    assert hi == pytest.approx(np.percentile(pos, 99), abs=1e-6)
    assert parse_reference(json.dumps(ref)) == ref
    assert parse_reference("null") is None
    values, mode, label = scale_scores(
        np.array([lo, hi, (lo + hi) / 2, 0.3]),
        "instance_prob",
        reference=ref,
        class_names={0: "normal", 1: "tumour"},
    )
    assert mode == "validation"
    np.testing.assert_allclose(values[:3], [0.0, 1.0, 0.5], atol=1e-9)
    assert values[3] < 0  # below the highest normal patch: not painted
    tie = scale_scores(np.array([lo]), "instance_prob", reference=ref)[0]
    assert tie[0] < 0  # a tie at the cut-off is not painted either
    assert default_threshold(mode) == 0.0
    assert "every patch of the normal" in label and "tumour" in label
    # no negative validation slide: no reference, the old automatic choice
    assert validation_reference([b for b in bags if b.label], scores[1::2]) is None
    assert scale_scores(np.array([0.2, 0.4]), "instance_prob")[1] == "fixed"
    with pytest.raises(ValueError, match="validation reference"):
        scale_scores(np.array([0.2]), "instance_prob", "validation")
    both = mean_reference([ref, ref])
    assert both["negative"] == pytest.approx(ref["negative"])
    assert both["n_negative"] == 200


def test_calibration_bins_hand_computed():
    from tiahnm.evaluation.curves import calibration_bins

    probs = np.array([0.05, 0.15, 0.5, 0.95, 0.99, 1.0])
    labels = np.array([0, 0, 1, 1, 0, 1])
    bins = calibration_bins(labels, probs, 5)
    assert [n for *_, n in bins] == [2, 1, 3]  # 1.0 falls in the last bin
    assert bins[0][:2] == pytest.approx((0.1, 0.0))
    assert bins[1][:2] == pytest.approx((0.5, 1.0))
    assert bins[2][:2] == pytest.approx((0.98, 2 / 3))


def test_deep_zoom_levels_and_tiles(tmp_path):
    img = np.zeros((300, 520, 3), np.uint8)
    img[:, 260:] = 255
    dz = write_deep_zoom(img, (1040, 600), tmp_path / "s_files", tile_size=254)
    top = math.ceil(math.log2(520))  # 10
    assert sorted(int(p.name) for p in dz.folder.iterdir()) == list(range(top + 1))
    top_tiles = sorted(p.name for p in (dz.folder / str(top)).iterdir())
    assert top_tiles == [
        "0_0.jpg",
        "0_1.jpg",
        "1_0.jpg",
        "1_1.jpg",
        "2_0.jpg",
        "2_1.jpg",
    ]
    # overlap 1 on inner edges only; the last column is what is left
    assert Image.open(dz.folder / str(top) / "0_0.jpg").size == (255, 255)
    assert Image.open(dz.folder / str(top) / "1_1.jpg").size == (256, 47)
    assert Image.open(dz.folder / str(top) / "2_0.jpg").size == (13, 255)
    assert Image.open(dz.folder / "0" / "0_0.jpg").size == (1, 1)
    assert Image.open(dz.folder / str(top - 1) / "0_0.jpg").size == (
        255,
        150,
    )  # 260 wide
    assert dz.n_tiles == sum(1 for _ in dz.folder.rglob("*.jpg"))
    src = dz.tile_source(tmp_path)["Image"]
    assert src["Url"] == "s_files/" and src["Size"] == {"Width": "520", "Height": "300"}


def test_grid_puts_each_patch_in_its_cell():
    coords = np.array([[100, 50], [164, 50], [100, 114], [228, 178]])
    slide = SlideScores("s", np.zeros(4, np.float32), coords=coords)
    slide.meta["patch_size_level0"] = [64, 64]
    g = _grid(slide, np.array([0.1, 0.2, 0.3, 0.4]))
    assert (g["cols"], g["rows"], g["x"], g["y"], g["w"], g["h"]) == (
        3,
        3,
        100.0,
        50.0,
        192.0,
        192.0,
    )
    assert g["values"] == [0.1, 0.2, None, 0.3, None, None, None, None, 0.4]


class _PickFirst(Miner):
    """A plugin-style miner: records the first instance of each bag it forwards."""

    name = "pick_first"

    def forward(self, ctx, features, label, step):
        self.record_mined("first instances", ctx.bag, [0], step=f"step {step}")
        return super().forward(ctx, features, label, step)


def test_record_mined_keeps_ids_coords_and_cap():
    bag = make_bags(1, 2)[0]
    bag.coords = np.array([[i * 10, 5] for i in range(bag.n_instances)])
    m = _PickFirst()
    m.record_mined("k", bag, [2, 1], step="epoch 0", scores=[0.9, 0.8])
    rec = m.mined_records()[0]
    assert rec["indices"] == [2, 1] and rec["coords"] == [[20, 5], [10, 5]]
    assert rec["scores"] == [0.9, 0.8] and rec["slide_id"] == bag.slide_id
    for _ in range(1000):
        m.record_mined("k", bag, [0], step="x")
    from tiahnm.miners.base import MAX_MINED_RECORDS

    assert len(m.mined_records()) == MAX_MINED_RECORDS


def test_mhim_records_masked_high_score_instances():
    from tiahnm.heads.abmil import ABMIL
    from tiahnm.miners.mhim import MHIMMiner

    torch.manual_seed(0)
    bags = make_bags(8, 8, min_n=20, max_n=20)
    head = ABMIL(8, 2, embed_dim=16, attn_dim=8)
    # no warm-up: the teacher masks from the first epoch
    miner = MHIMMiner(mask_ratio_h=0.1, score="attention", teacher_warmup=0)
    ctx = FitContext(head=head, device=torch.device("cpu"), epochs=2, steps_per_epoch=8)
    miner.on_fit_start(ctx)
    head.train()
    n_high = {}
    for step, bag in enumerate(bags * 2):
        ctx.bag = bag
        miner.forward(ctx, bag.features, torch.tensor([bag.label]), step)
        n_high[(bag.slide_id, f"epoch {step // 8}")] = miner.last_stats["n_high"]
    recs = miner.mined_records()
    positives = [b.slide_id for b in bags if b.label == 1][:3]
    assert {r["slide_id"] for r in recs} == set(positives)
    assert len(recs) == 6  # 3 sample bags x 2 epochs
    assert sorted({r["step"] for r in recs}) == ["epoch 0", "epoch 1"]
    for r in recs:
        assert r["kind"] == "masked high-score instances"
        assert len(r["indices"]) == n_high[(r["slide_id"], r["step"])] > 0
        assert r["scores"] == sorted(r["scores"], reverse=True)
        assert r["coords"] is None  # these bags have no coordinates


def test_hnm_records_the_rounds_top_hard_negatives():
    from tests.miners import test_hnm as h
    from tiahnm.miners.hnm_selection import hard_negative_mask

    bags = h.image_bags(6, 10)
    head = h.tiny_head()
    m = h.miner(finetune_epochs=0, neg_ratio=0.2)
    ctx = h.ctx_for(head)
    m.on_fit_start(ctx)
    m.on_round_end(ctx, bags)
    recs = m.mined_records()
    assert recs and {r["kind"] for r in recs} == {
        "hard negatives (encoder fine-tuning)"
    }
    assert {r["step"] for r in recs} == {"round 0"}
    neg = [b for b in bags if b.label == 0]
    flat = np.concatenate([m.scores[b.slide_id].double().numpy() for b in neg])
    keep = hard_negative_mask(flat, np.zeros(len(flat)), 0.2)
    want = {(neg[i // 10].slide_id, i % 10) for i in np.flatnonzero(keep)}
    got = {(r["slide_id"], i) for r in recs for i in r["indices"]}
    assert got == want  # H(0.2): 6 of 30 negative-slide patches, all under 24
    for r in recs:
        assert r["label"] == 0
        assert r["scores"] == pytest.approx(
            m.scores[r["slide_id"]].double().numpy()[r["indices"]].tolist()
        )


def test_li2019_records_false_positive_and_generated_bags():
    from tests.miners import test_li2019 as li
    from tiahnm.miners.li2019 import Li2019Miner, hard_negative_mask

    bags = li.train_bags()
    head = li.tiny_head()
    miner = Li2019Miner(mode="mb", n_bags=3, fp_threshold=0.0)
    ctx = li.ctx_for(head, round_idx=0)
    miner.on_fit_start(ctx)
    new = miner.on_round_end(ctx, bags)
    recs = miner.mined_records()
    fps = [r for r in recs if r["kind"].startswith("false-positive")]
    negatives = {b.slide_id: b for b in bags if b.label == 0}
    assert {r["slide_id"] for r in fps} == set(negatives)  # threshold 0: all FP
    head.eval()
    with torch.no_grad():
        for r in fps:
            b = negatives[r["slide_id"]]
            a = head(b.features).attention[0]
            assert set(r["indices"]) == set(
                torch.nonzero(hard_negative_mask(a)).flatten().tolist()
            )
    gen = [r for r in recs if r["kind"] == "generated hard-negative bags"]
    for i in (0, 1):  # the first two generated bags: where their instances came from
        parts = [r for r in gen if r["step"] == f"round 0, generated bag {i}"]
        rows = sorted(
            tuple(negatives[r["slide_id"]].features[k].tolist())
            for r in parts
            for k in r["indices"]
        )
        assert rows == sorted(tuple(x) for x in new[i].features[:48].tolist())


# ----------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick demo (4 slides, 2 folds) with a validation split."""
    out = tmp_path_factory.mktemp("report") / "demo"
    res = CliRunner().invoke(
        cli,
        [
            "run",
            "--demo",
            "--quick",
            "--output-path",
            str(out),
            "--set",
            "cv.val_fraction=0.5",
            "--set",
            "evaluation.heatmaps=1",
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def test_report_html_folder(quick_run):
    out = quick_run
    page = (out / "report.html").read_text()
    for section in ("metrics", "viewer-section", "galleries", "mined"):
        assert f'id="{section}"' in page or f"id='{section}'" in page, section
    assert "http://" not in page.replace("http://www.w3.org", "")
    assert "https://" not in page
    for png in ("roc.png", "pr.png", "calibration.png", "confusion.png"):
        assert (out / "report_files" / png).is_file(), png
    assert "Kaplan-Meier" not in page  # a binary run: no survival curves
    data = json.loads(
        (out / "report_files" / "data.js").read_text().split("= ", 1)[1].rstrip(";\n")
    )
    ids = sorted(s["id"] for s in data["slides"])
    assert ids == [f"demo_{i:02d}" for i in range(4)]  # every test slide
    for s in data["slides"]:
        url = s["tile_source"]["Image"]["Url"]
        assert (out / url / "0" / "0_0.jpg").is_file()
        assert s["scale_label"].startswith("Colour scale (")
        top = sorted((out / "galleries" / s["id"]).glob("top_*.png"))
        bottom = sorted((out / "galleries" / s["id"]).glob("bottom_*.png"))
        assert len(top) == len(bottom) == 8
        assert Image.open(top[0]).size == (96, 96)
        assert re.search(
            r"label (normal|tumour), prediction (normal|tumour)", s["title"]
        )
    assert sum(bool(s["outlines"]) for s in data["slides"]) >= 1  # tumour outlines
    mined = json.loads((out / "folds" / "r0_f0" / "mined.json").read_text())
    assert mined["miner"] == "mhim" and mined["records"]
    assert "masked high-score instances" in page
    assert list((out / "galleries" / "mined" / "r0_f0").rglob("*.png"))
    # the scale is relative to validation slides where the fold has negative ones
    from tiahnm.evaluation.scores import find_score_files, read_instance_scores

    for path in find_score_files(out):
        slides, attrs = read_instance_scores(path)
        has_ref = parse_reference(attrs.get("val_reference")) is not None
        for sl in slides:
            entry = next(s for s in data["slides"] if s["id"] == sl.slide_id)
            label = entry["scale_label"]
            assert label.startswith("Colour scale (validation)") == has_ref, label


def test_mined_patches_of_slide_patch_bags_are_read_from_the_slide(quick_run):
    """HNM fine-tunes on slide-patch bags (source: the slide): galleries still work."""
    from tiahnm.data.slide_patches import SlidePatchBags
    from tiahnm.evaluation.html_report import PATCH_PX, _mined_crops

    data = quick_run / "data"
    bags = SlidePatchBags(
        str(data / "slides" / "demo_01.tif"),
        str(data / "labels.csv"),
        resolution=1.0,
        patch_size=32,
        max_patches=20,
    ).load()
    bag = bags[0]
    m = Miner()
    m.record_mined("k", bag, [3, 7], step="round 0")
    rec = m.mined_records()[0]
    assert rec["patch_size_level0"] == [float(v) for v in bag.meta["patch_size_level0"]]
    crops = _mined_crops([rec])[id(rec)]
    own = {}
    for k in (3, 7):
        img = bag.features[k].reshape(3, 32, 32).permute(1, 2, 0).numpy() * 255
        own[k] = np.asarray(
            Image.fromarray(img.round().astype(np.uint8)).resize((96, 96))
        )
    for k, crop in zip((3, 7), crops, strict=True):
        assert crop.shape == (PATCH_PX, PATCH_PX, 3)
        assert np.abs(crop.astype(float) - own[k]).mean() < 1.0  # the same pixels
    assert np.abs(crops[0].astype(float) - own[7]).mean() > 3.0  # not any patch


def test_report_command_rewrites_html(quick_run):
    page = quick_run / "report.html"
    before = page.read_text()
    page.unlink()
    res = CliRunner().invoke(cli, ["report", str(quick_run)])
    assert res.exit_code == 0, res.output
    assert f"HTML report: {page}" in res.output
    assert page.is_file()
    # the run's files alone make the page: rewritten, it is the page the run wrote
    assert page.read_text() == before


def test_standalone_heatmap_uses_class_names_and_outlines(
    quick_run, tmp_path, monkeypatch
):
    import tiahnm.evaluation.heatmap as hm

    calls = []
    real = hm.render_heatmap

    def spy(slide, out, **kw):
        calls.append((slide, kw))
        return real(slide, out, **kw)

    monkeypatch.setattr(hm, "render_heatmap", spy)
    fold = quick_run / "folds" / "r0_f0"  # a fold folder: the run's config is found
    res = CliRunner().invoke(
        cli, ["heatmap", str(fold), "--output-path", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert calls and len(list(tmp_path.glob("demo_??.png"))) == len(calls)
    for slide, kw in calls:
        assert kw["class_names"] == {0: "normal", 1: "tumour"}
        # the demo's tumour slides have annotated regions, outlined
        assert bool(kw["outlines"]) == (slide.label == 1)


def test_predict_output_gets_galleries_and_report(quick_run, tmp_path):
    feats = sorted((quick_run / "features").glob("demo_0[01].h5"))
    res = CliRunner().invoke(
        cli,
        ["predict", str(quick_run), *map(str, feats), "--output-path", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.html").is_file()
    assert len(list((tmp_path / "galleries" / "demo_00").glob("top_*.png"))) == 8
    page = (tmp_path / "report.html").read_text()
    assert "Predictions:" in page and 'id="viewer"' in page
    (tmp_path / "report.html").unlink()
    again = CliRunner().invoke(cli, ["report", str(tmp_path)])  # a predict folder
    assert again.exit_code == 0, again.output
    assert (tmp_path / "report.html").is_file()
    # the ensemble's colour scale: the mean of the folds' validation references
    import h5py

    refs = []
    for f in sorted(quick_run.glob("folds/*/instance_scores.h5")):
        with h5py.File(f) as h:
            refs.append(parse_reference(h.attrs["val_reference"]))
    with h5py.File(tmp_path / "instance_scores.h5") as h:
        got = parse_reference(h.attrs["val_reference"])
    want = mean_reference(refs)
    assert (got is None) == (want is None)
    if want:
        assert got["negative"] == pytest.approx(want["negative"])


def _set(driver, control: str, value: str) -> None:
    driver.execute_script(
        "var t = document.getElementById(arguments[0]); t.value = arguments[1];"
        "t.dispatchEvent(new Event('input'));",
        control,
        value,
    )


def _shot(driver, path: Path) -> np.ndarray:
    driver.find_element("id", "viewer").screenshot(str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))
def test_report_in_headless_chromium(quick_run, tmp_path):
    # a small window: the home view needs less than the top level of the pyramid
    with browser.chromium(560, 800) as driver:
        driver.get((quick_run / "report.html").resolve().as_uri())
        browser.wait_for(driver, "window.tiahnmProbe && window.tiahnmProbe.opened >= 1")
        browser.wait_for(
            driver, "window.tiahnmViewer.world.getItemAt(0).getFullyLoaded()"
        )
        _set(
            driver,
            "threshold",
            driver.execute_script("return document.getElementById('threshold').min;"),
        )
        painted = driver.execute_script("return window.tiahnmProbe.overlayPixels;")
        _set(driver, "opacity", "0.8")
        with_overlay = _shot(driver, tmp_path / "overlay.png")
        _set(driver, "opacity", "0")
        without = _shot(driver, tmp_path / "plain.png")
        _set(
            driver,
            "threshold",
            driver.execute_script("return document.getElementById('threshold').max;"),
        )
        fewer = driver.execute_script("return window.tiahnmProbe.overlayPixels;")
        before = driver.execute_script("return Object.assign({}, window.tiahnmProbe);")
        driver.execute_script("window.tiahnmViewer.viewport.zoomTo(8, null, true);")
        browser.wait_for(driver, f"window.tiahnmProbe.maxLevel > {before['maxLevel']}")
        browser.wait_for(
            driver, "window.tiahnmViewer.world.getItemAt(0).getFullyLoaded()"
        )
        after = driver.execute_script("return Object.assign({}, window.tiahnmProbe);")
        zoomed = _shot(driver, tmp_path / "zoomed.png")
        errors = browser.console_errors(driver)
    assert errors == []
    assert before["opened"] == 1 and before["tilesLoaded"] > 0
    assert after["maxLevel"] > before["maxLevel"]  # zooming fetched deeper tiles
    assert after["tilesLoaded"] > before["tilesLoaded"]
    assert without.std() > 10 and zoomed.std() > 10  # not blank
    assert painted == before["overlayPixels"] or fewer < painted
    assert painted > 0 and fewer < painted
    changed = (np.abs(with_overlay - without).max(axis=2) > 40).sum()
    assert changed > 0.05 * without.shape[0] * without.shape[1]  # the overlay is drawn
