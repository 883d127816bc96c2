"""Instance labels of image and slide bags from masks and GeoJSON, and drop logs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tiahnm.config import from_dict
from tiahnm.crossval import run_training
from tiahnm.data.image_patches import ImagePatchBags
from tiahnm.errors import DataError
from tiahnm.plugins import get_registry

P = 16


def write_png(path, arr):
    Image.fromarray(arr).save(path)


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def geojson(path, rings):
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [r]}}
        for r in rings
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


@pytest.fixture
def images(tmp_path):
    """Two 48 x 32 tissue images (3 x 2 patches of 16 px) and one all-white column."""
    root = tmp_path / "img"
    root.mkdir()
    a = np.full((32, 48, 3), 120, dtype=np.uint8)
    write_png(root / "pos.png", a)
    b = a.copy()
    b[:, 32:] = 255  # right column white: dropped by the background filter
    write_png(root / "neg.png", b)
    (root / "labels.csv").write_text("image,malignant\npos.png,1\nneg.png,0\n")
    return root


# Positive region of pos.png: patch (0, 0) fully, patch (16, 0) to 3/4, patch (32, 16)
# to 1/4 (x 32..48, y 28..32); grid order (0,0) (16,0) (32,0) (0,16) (16,16) (32,16).
REGION = [square(0, 0, 16, 16), square(16, 0, 28, 16), square(32, 28, 48, 32)]
AT_HALF = [1, 1, 0, 0, 0, 0]
AT_FOUR_FIFTHS = [1, 0, 0, 0, 0, 0]
AT_ONE_FIFTH = [1, 1, 0, 0, 0, 1]


def mask_of(rings, shape=(32, 48)):
    m = np.zeros(shape, dtype=np.uint8)
    for r in rings:
        (x0, y0), (x1, y1) = r[0], r[2]
        m[y0:y1, x0:x1] = 255
    return m


@pytest.mark.parametrize("kind", ["mask", "geojson"])
@pytest.mark.parametrize(
    ("min_overlap", "expected"),
    [(0.5, AT_HALF), (0.8, AT_FOUR_FIFTHS), (0.2, AT_ONE_FIFTH)],
)
def test_image_instance_labels_from_mask_and_geojson(
    images, tmp_path, kind, min_overlap, expected
):
    labels = tmp_path / "labels"
    labels.mkdir()
    if kind == "mask":
        write_png(labels / "pos_mask.png", mask_of(REGION))
    else:
        geojson(labels / "pos.geojson", REGION)
    bags = ImagePatchBags(
        str(images), patch_size=P, instance_labels=str(labels), min_overlap=min_overlap
    ).load()
    pos, neg = bags
    assert pos.coords.tolist() == [
        [0, 0],
        [16, 0],
        [32, 0],
        [0, 16],
        [16, 16],
        [32, 16],
    ]
    assert pos.instance_labels.tolist() == expected
    # the negative image has no file: every kept patch is negative
    assert neg.coords.tolist() == [[0, 0], [16, 0], [0, 16], [16, 16]]
    assert neg.instance_labels.tolist() == [0, 0, 0, 0]


def test_mask_at_a_lower_resolution_and_labels_follow_the_kept_patches(
    images, tmp_path
):
    labels = tmp_path / "labels"
    labels.mkdir()
    # neg.png's mask at half size marks patch (16, 16) (dropped patches are skipped)
    half = np.zeros((16, 24), dtype=np.uint8)
    half[8:16, 8:16] = 1
    write_png(labels / "neg_mask.png", half)
    write_png(labels / "pos_mask.png", mask_of(REGION))
    bags = ImagePatchBags(str(images), patch_size=P, instance_labels=str(labels)).load()
    assert bags[1].instance_labels.tolist() == [0, 0, 0, 1]


def test_instance_label_errors(images, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    with pytest.raises(DataError, match=r"pos\.png: positive bag without instance"):
        ImagePatchBags(str(images), patch_size=P, instance_labels=str(labels)).load()
    write_png(labels / "pos_mask.png", mask_of(REGION))
    geojson(labels / "pos.geojson", REGION)
    with pytest.raises(DataError, match=r"several instance-label files for 'pos'"):
        ImagePatchBags(str(images), patch_size=P, instance_labels=str(labels)).load()
    with pytest.raises(DataError, match=r"instance_labels: .*missing is not a folder"):
        ImagePatchBags(str(images), instance_labels=str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"min_overlap must be in \(0, 1\]"):
        ImagePatchBags(str(images), instance_labels=str(labels), min_overlap=0)
    (labels / "pos.geojson").write_text("{not json")
    (labels / "pos_mask.png").unlink()
    with pytest.raises(DataError, match=r"pos\.geojson: unreadable GeoJSON"):
        ImagePatchBags(str(images), patch_size=P, instance_labels=str(labels)).load()


def test_background_filter_logs_per_image_and_total(images, caplog):
    with caplog.at_level(logging.INFO, logger="tiahnm"):
        ImagePatchBags(str(images), patch_size=P).load()
    text = caplog.text
    assert "image_patches: neg: dropped 2 of 6 patches (white background)" in text
    assert "image_patches: pos: dropped" not in text
    assert "image_patches: dropped 2 of 12 patches (16.7%, white background)" in text


def test_slide_instance_labels_from_geojson_and_mask(tmp_path, caplog):
    from tiahnm.demo.slides import SlideSpec, draw_slide, write_pyramid_tiff
    from tiahnm.slides.tiling import patch_fractions

    root, labels = tmp_path / "wsi", tmp_path / "labels"
    root.mkdir()
    labels.mkdir()
    drawn = {}
    for i in range(2):
        spec = SlideSpec(f"s{i}", 256, 192, tumour=i == 1, seed=i)
        drawn[spec.slide_id] = draw_slide(spec)
        write_pyramid_tiff(
            root / f"s{i}.tif", drawn[spec.slide_id].image, mpp=1.0, levels=1
        )
    (root / "labels.csv").write_text("slide_id,label\ns0,0\ns1,1\n")
    rings = [r.tolist() for r in drawn["s1"].tumour_regions]
    geojson(labels / "s1.geojson", rings)
    opts = {
        "slides": str(root),
        "labels_csv": str(root / "labels.csv"),
        "resolution": 1.0,
        "units": "baseline",
        "patch_size": P,
        "instance_labels": str(labels),
    }
    with caplog.at_level(logging.INFO, logger="tiahnm"):
        get_registry("bag_source").create("slide_patches", **opts).load()
    assert (
        "slide_patches: s0: dropped 96 of 192 patches (tissue fraction" in caplog.text
    )
    assert "slide_patches: dropped 225 of 384 patches" in caplog.text
    # no tissue mask: the tumour covers part of the patches only
    opts["masker"] = "none"
    bags = get_registry("bag_source").create("slide_patches", **opts).load()
    s0, s1 = bags
    assert s0.instance_labels.tolist() == [0] * s0.n_instances
    # oracle: the rasterised tumour of the drawing, fraction per patch footprint
    canvas = Image.new("L", (256, 192), 0)
    for r in rings:
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in r], fill=1)
    tumour = np.asarray(canvas) > 0
    boxes = np.column_stack([s1.coords, s1.coords + P]).astype(np.float64)
    frac = patch_fractions(tumour, boxes, (256, 192))
    clear = np.abs(frac - 0.5) > 0.1  # away from the threshold (rasterisation)
    assert clear.sum() > 0.8 * len(frac) and 0 < s1.instance_labels.sum() < len(frac)
    assert np.array_equal(s1.instance_labels[clear], frac[clear] >= 0.5)
    # the same labels from a mask image
    (labels / "s1.geojson").unlink()
    write_png(labels / "s1_mask.png", tumour.astype(np.uint8) * 255)
    again = get_registry("bag_source").create("slide_patches", **opts).load()[1]
    assert np.array_equal(again.instance_labels[clear], s1.instance_labels[clear])
    # a positive slide without labels stops the run (it is not skipped)
    (labels / "s1_mask.png").unlink()
    with pytest.raises(DataError, match=r"s1\.tif: positive bag without instance"):
        get_registry("bag_source").create("slide_patches", **opts).load()


def _mnist_mosaics(shared_data, root, n_images=16, grid=3, target=9):
    """Mosaics of grid x grid MNIST digits; a mask marks the target digits."""
    from tiahnm.data.mnist_bags import read_mnist_csv

    pixels, digits = read_mnist_csv(shared_data / "mnist-5k" / "mnist_5k.csv.gz")
    rng = np.random.default_rng(0)
    others, targets = np.flatnonzero(digits != target), np.flatnonzero(digits == target)
    (root / "masks").mkdir(parents=True)
    rows, truth = ["image,malignant"], {}
    for i in range(n_images):
        idx = rng.choice(others, grid * grid, replace=False)
        positive = i % 2 == 1
        if positive:
            slots = rng.choice(grid * grid, 2, replace=False)
            idx[slots] = rng.choice(targets, 2, replace=False)
        tiles = pixels[idx].reshape(grid, grid, 28, 28)
        image = tiles.transpose(0, 2, 1, 3).reshape(grid * 28, grid * 28)
        is_target = (digits[idx] == target).reshape(grid, grid)
        mask = np.kron(is_target, np.ones((28, 28))).astype(np.uint8)
        write_png(root / f"m{i:02d}.png", image)
        if positive:
            write_png(root / "masks" / f"m{i:02d}_mask.png", mask * 255)
        rows.append(f"m{i:02d}.png,{int(positive)}")
        truth[f"m{i:02d}"] = is_target.ravel().astype(int).tolist()
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return truth


@pytest.mark.shared_data
def test_mnist_mosaics_instance_metrics_in_summary(shared_data, tmp_path):
    root = tmp_path / "mosaics"
    root.mkdir()
    truth = _mnist_mosaics(shared_data, root)
    options = {
        "root": str(root),
        "patch_size": 28,
        "mode": "L",
        "instance_labels": str(root / "masks"),
        "max_white_fraction": 1.0,
    }
    bags = ImagePatchBags(**options).load()
    assert {b.slide_id: b.instance_labels.tolist() for b in bags} == truth
    cfg = from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "seed": 0,
            "data": {"source": "image_patches", "options": options},
            "head": {
                "name": "encoder_mil",
                "options": {
                    "image_shape": [1, 28, 28],
                    "head": "abmil_gated",
                    "head_options": {"embed_dim": 16, "attn_dim": 8},
                },
            },
            "train": {"epochs": 2, "lr": 1e-3, "progress": False},
            "cv": {"folds": 2, "val_fraction": 0.25},
            "evaluation": {"bootstrap": 0, "instance_score": "attention"},
        }
    )
    summary = run_training(cfg)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("instance_auc", "instance_ap", "instance_f1"):
        assert key in summary["metrics"] and key in on_disk["metrics"]
        assert 0.0 <= summary["metrics"][key]["mean"] <= 1.0
    assert "instance AUC" in (tmp_path / "out" / "report.md").read_text()
    import h5py

    with h5py.File(tmp_path / "out" / "folds" / "r0_f0" / "instance_scores.h5") as f:
        assert f.attrs["score_kind"] == "attention"
    # each fold's instance metrics are scikit-learn's on its test slides' stored
    # scores against the mosaics' own digit labels, F1 at the stored threshold
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    from tiahnm.evaluation.scores import read_instance_scores

    folds = {key: [] for key in ("instance_auc", "instance_ap", "instance_f1")}
    tested = []
    for fold in summary["folds"]:
        name = f"r{fold['repeat']}_f{fold['fold']}"
        slides, attrs = read_instance_scores(
            tmp_path / "out" / "folds" / name / "instance_scores.h5"
        )
        tested += [s.slide_id for s in slides]
        y = np.concatenate([truth[s.slide_id] for s in slides])
        scores = np.concatenate([s.scores for s in slides]).astype(np.float64)
        want = {
            "instance_auc": roc_auc_score(y, scores),
            "instance_ap": average_precision_score(y, scores),
            "instance_f1": f1_score(y, scores >= attrs["instance_threshold"]),
        }
        for key, value in want.items():
            assert fold["metrics"][key] == pytest.approx(value, abs=1e-5), key
            folds[key].append(fold["metrics"][key])
    assert sorted(tested) == sorted(truth)  # every mosaic tested once
    for key, values in folds.items():
        assert summary["metrics"][key]["mean"] == pytest.approx(np.mean(values))
