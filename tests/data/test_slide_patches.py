"""Whole-slide images as bags of patch images, and the HNM loop on them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tiahnm.config import TrainConfig
from tiahnm.demo.slides import SlideSpec, draw_slide, write_pyramid_tiff
from tiahnm.errors import DataError
from tiahnm.heads.end_to_end import EncoderMIL
from tiahnm.losses.ranking import MIRankLoss
from tiahnm.miners.hnm import HNMMiner
from tiahnm.plugins import get_registry
from tiahnm.training.loop import fit

P = 16


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi")
    images = {}
    for i in range(4):
        spec = SlideSpec(f"s{i}", 384, 320, tumour=i % 2 == 1, seed=i)
        drawn = draw_slide(spec)
        write_pyramid_tiff(root / f"s{i}.tif", drawn.image, mpp=1.0, levels=2)
        images[spec.slide_id] = drawn.image
    (root / "broken.svs").write_bytes(b"not a slide" * 100)
    (root / "labels.csv").write_text(
        "slide_id,label\ns0,0\ns1,1\ns2,0\ns3,1\nbroken,0\n"
    )
    return root, images


def source(root, **kw):
    opts = {
        "slides": str(root),
        "labels_csv": str(root / "labels.csv"),
        "resolution": 1.0,
        "units": "baseline",
        "patch_size": P,
    }
    opts.update(kw)
    return get_registry("bag_source").create("slide_patches", **opts)


def test_patches_are_the_slide_pixels_and_a_bad_slide_is_skipped(slide_dir, caplog):
    root, images = slide_dir
    src = source(root)
    with caplog.at_level(logging.WARNING):
        bags = src.load()
    assert [b.slide_id for b in bags] == ["s0", "s1", "s2", "s3"]
    assert [b.label for b in bags] == [0, 1, 0, 1]
    assert len(src.failures) == 1 and src.failures[0][0].endswith("broken.svs")
    assert "broken.svs" in caplog.text and "Skipped" in caplog.text
    for bag in bags:
        n = bag.n_instances
        assert n > 10 and bag.features.shape == (n, 3 * P * P)
        assert bag.meta["image_shape"] == [3, P, P]
        assert 0.0 <= float(bag.features.min()) and float(bag.features.max()) <= 1.0
        patches = bag.features.reshape(n, 3, P, P).permute(0, 2, 3, 1).numpy() * 255
        image = images[bag.slide_id]
        for k in (0, n // 2, n - 1):
            x, y = (int(v) for v in bag.coords[k])
            want = image[y : y + P, x : x + P].astype(np.float32)
            # JPEG-compressed tiles: close to the drawn pixels, not identical
            assert np.abs(patches[k] - want).mean() < 8.0


def test_max_patches_and_errors(slide_dir, tmp_path):
    root, _ = slide_dir
    full = source(root).load()
    capped = source(root, max_patches=5).load()
    for a, b in zip(full, capped, strict=True):
        assert b.n_instances == 5
        rows = {tuple(c) for c in a.coords.tolist()}
        assert {tuple(c) for c in b.coords.tolist()} <= rows
    with pytest.raises(DataError, match="max_patches"):
        source(root, max_patches=0)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.svs").write_bytes(b"junk")
    (only_bad / "labels.csv").write_text("slide_id,label\nx,1\n")
    with pytest.raises(DataError, match=r"no slide could be loaded.*x\.svs"):
        source(only_bad).load()


def test_hnm_fine_tunes_the_encoder_on_slide_patches(slide_dir):
    root, _ = slide_dir
    bags = source(root, max_patches=24).load()
    torch.manual_seed(0)
    head = EncoderMIL(
        3 * P * P,
        2,
        image_shape=[3, P, P],
        encoder_options={"out_dim": 8, "width": 4},
        head="dsmil",
        head_options={"embed_dim": 8, "query_dim": 4, "dropout": 0.0},
    )
    before = {k: v.clone() for k, v in head.encoder.state_dict().items()}
    miner = HNMMiner(batch_size=16, finetune_epochs=1, warmup=0, proj_dim=4)
    cfg = TrainConfig(epochs=1, rounds=2, patience=5, lr=1e-3, progress=False)
    res = fit(head, bags, [], cfg, miner=miner, losses=[(MIRankLoss(k=2), 0.1)], seed=0)
    assert res.history[-1]["hnm_finetune_steps"] > 0
    assert res.history[-1]["hnm_hard_negatives"] >= 1
    changed = [
        k for k, v in head.encoder.state_dict().items() if not torch.equal(before[k], v)
    ]
    assert changed


@pytest.mark.shared_data
def test_real_svs_slides(shared_data, tmp_path, caplog):
    slides = shared_data / "slides"
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide_id,label\nCMU-1-Small-Region,1\ntcga-cr-7395-01a-01-ts1,0\n"
    )
    opts = {
        "slides": [
            str(slides / "CMU-1-Small-Region.svs"),
            str(slides / "tcga-cr-7395-01a-01-ts1.svs"),
        ],
        "labels_csv": str(labels),
        "resolution": 4.0,
        "units": "mpp",
        "patch_size": 32,
    }
    reg = get_registry("bag_source")
    with caplog.at_level(logging.WARNING):
        bags = reg.create("slide_patches", **opts).load()
    # the TCGA slide has no mpp: reported and skipped, the other one loads
    assert [b.slide_id for b in bags] == ["CMU-1-Small-Region"]
    assert "tcga-cr-7395-01a-01-ts1.svs: no resolution metadata" in caplog.text
    bags = reg.create("slide_patches", **opts, mpp=0.25).load()
    assert [b.label for b in bags] == [1, 0]
    for bag, dims in zip(bags, ((2220, 2967), (4443, 3567)), strict=True):
        assert bag.n_instances > 20 and bag.features.shape[1] == 3 * 32 * 32
        assert (bag.coords >= 0).all() and (bag.coords < dims).all()
        # tissue, not background: H&E patches are well below white on average
        assert float(bag.features.mean()) < 0.9
