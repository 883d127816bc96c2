"""Readers of other tools' feature files: features and level-0 coordinates.

Each fixture is written the way that tool writes it (CLAM extract_features_fp.py /
save_hdf5, STAMP preprocessing, slide2vec write_tile_embeddings + hs2p tiling io);
the TIAToolbox one was written by DeepFeatureExtractor itself
(tests/data/foreign/make_tia_zarr.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tiahnm.errors import DataError
from tiahnm.plugins import get_registry

FOREIGN = Path(__file__).parent / "foreign"
SLIDES = Path(__file__).parents[2] / ".." / "shared" / "data" / "slides"
MPP = 0.499


def _labels(tmp_path: Path, ids: list[str]) -> str:
    path = tmp_path / "labels.csv"
    path.write_text(
        "slide_id,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(ids))
    )
    return str(path)


def _source(name: str, **options):
    return get_registry("bag_source").create(name, **options)


def _grid(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 256, (np.arange(n) % 3) * 256], axis=1).astype(
        np.int64
    )


def _clam_save_hdf5(path: Path, assets: dict[str, np.ndarray]) -> None:
    """CLAM utils/file_utils.save_hdf5 (mode 'w', resizable chunked datasets)."""
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            f.create_dataset(
                key,
                shape=val.shape,
                maxshape=(None, *val.shape[1:]),
                chunks=(1, *val.shape[1:]),
                dtype=val.dtype,
            )[:] = val


def test_clam_pt_files_with_h5_coordinates(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "pt_files").mkdir()
    (tmp_path / "h5_files").mkdir()
    want = {}
    for sid, n in (("s1", 5), ("s2", 3)):
        feats = rng.normal(size=(n, 1024)).astype(np.float32)
        _clam_save_hdf5(
            tmp_path / "h5_files" / f"{sid}.h5", {"features": feats, "coords": _grid(n)}
        )
        torch.save(torch.from_numpy(feats), tmp_path / "pt_files" / f"{sid}.pt")
        want[sid] = feats
    bags = _source(
        "clam_pt",
        features_dir=str(tmp_path / "pt_files"),
        labels_csv=_labels(tmp_path, ["s1", "s2"]),
    ).load()
    for bag in bags:
        np.testing.assert_array_equal(bag.features.numpy(), want[bag.slide_id])
        np.testing.assert_array_equal(bag.coords, _grid(len(want[bag.slide_id])))
        assert "patch_size_level0" not in bag.meta  # CLAM's h5_files carry no attrs
    # CLAM's patching output (patches/<slide>.h5: coords only, with attributes)
    (tmp_path / "patches").mkdir()
    with h5py.File(tmp_path / "patches" / "s1.h5", "w") as f:
        dset = f.create_dataset("coords", data=_grid(5) + 7)
        dset.attrs["patch_level"], dset.attrs["patch_size"] = 1, 256
        dset.attrs["downsample"] = np.array([4.0, 4.0])  # level 1 of a 4x pyramid
    src = _source(
        "clam_pt",
        features_dir=str(tmp_path / "pt_files"),
        labels_csv=_labels(tmp_path, ["s1"]),
        h5_dir=str(tmp_path / "patches"),
    )
    (got,) = src.load()
    np.testing.assert_array_equal(got.coords, _grid(5) + 7)
    assert got.meta["patch_size_level0"] == [1024.0, 1024.0]
    # more coordinates than feature rows is an error naming the file
    torch.save(torch.zeros(4, 1024), tmp_path / "pt_files" / "s1.pt")
    with pytest.raises(DataError, match=r"s1\.pt: 5 coordinates for 4 feature rows"):
        src.load()


def _stamp_file(
    path: Path, feats: np.ndarray, coords_um: np.ndarray, extractor: str
) -> None:
    """As STAMP's preprocessing writes it: coords (um, float32), feats (fp16), attrs."""
    with h5py.File(path, "w") as h5_fp:
        h5_fp["coords"] = coords_um
        h5_fp["feats"] = torch.from_numpy(feats).half().numpy()
        h5_fp.attrs["stamp_version"] = "2.3.0"
        h5_fp.attrs["extractor"] = extractor
        h5_fp.attrs["unit"] = "um"
        h5_fp.attrs["tile_size_um"] = 256.0
        h5_fp.attrs["tile_size_px"] = 224
        h5_fp.attrs["code_hash"] = "0" * 8
        h5_fp.attrs["feat_type"] = "tile"


def test_stamp_h5_um_to_level0_pixels(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(4, 8)).astype(np.float32)
    px = np.array([[0, 0], [513, 0], [0, 1026], [513, 1026]], dtype=np.float64)
    coords_um = (px * MPP).astype(np.float32)
    _stamp_file(tmp_path / "s1.h5", feats, coords_um, "uni")
    (bag,) = _source(
        "stamp_h5",
        features_dir=str(tmp_path),
        labels_csv=_labels(tmp_path, ["s1"]),
        mpp=MPP,
    ).load()
    np.testing.assert_array_equal(
        bag.features.numpy(), feats.astype(np.float16).astype(np.float32)
    )
    np.testing.assert_allclose(bag.coords, coords_um.astype(np.float64) / MPP)
    np.testing.assert_allclose(bag.coords, px, atol=1e-3)
    # tile_size_um 256 at 0.499 um/px
    np.testing.assert_allclose(bag.meta["patch_size_level0"], [256.0 / MPP] * 2)


@pytest.mark.shared_data
def test_stamp_h5_reads_the_slide_mpp(tmp_path):
    if not (SLIDES / "CMU-1-Small-Region.svs").is_file():
        pytest.skip("../shared/data/slides is absent")
    coords_um = np.array([[0.0, 0.0], [499.0, 998.0]], dtype=np.float32)
    _stamp_file(
        tmp_path / "CMU-1-Small-Region.h5",
        np.ones((2, 4), np.float32),
        coords_um,
        "uni",
    )
    (bag,) = _source(
        "stamp_h5",
        features_dir=str(tmp_path),
        labels_csv=_labels(tmp_path, ["CMU-1-Small-Region"]),
        slides_dir=str(SLIDES),
    ).load()
    np.testing.assert_allclose(bag.coords, [[0, 0], [1000, 2000]], atol=1e-3)


def test_stamp_slide_level_file_is_refused(tmp_path):
    _stamp_file(
        tmp_path / "s1.h5",
        np.ones((1, 8), np.float32),
        np.zeros((1, 2), np.float32),
        "titan",
    )
    with h5py.File(tmp_path / "s1.h5", "a") as f:
        f.attrs["feat_type"] = "slide"
    src = _source(
        "stamp_h5",
        features_dir=str(tmp_path),
        labels_csv=_labels(tmp_path, ["s1"]),
        mpp=MPP,
    )
    with pytest.raises(DataError, match=r"s1\.h5: STAMP feat_type 'slide'"):
        src.load()


def test_mixed_encoders_are_refused_naming_the_files(tmp_path):
    _stamp_file(
        tmp_path / "a.h5",
        np.ones((2, 8), np.float32),
        np.zeros((2, 2), np.float32),
        "uni",
    )
    _stamp_file(
        tmp_path / "b.h5",
        np.ones((2, 8), np.float32),
        np.zeros((2, 2), np.float32),
        "virchow2",
    )
    src = _source(
        "stamp_h5",
        features_dir=str(tmp_path),
        labels_csv=_labels(tmp_path, ["a", "b"]),
        mpp=MPP,
    )
    with pytest.raises(
        DataError,
        match=r"mix encoders \(uni: 1 file\(s\) .*a\.h5; virchow2: 1 file\(s\) .*b\.h5\)",
    ):
        src.load()


def _slide2vec_output(
    root: Path, sid: str, feats: np.ndarray, x: np.ndarray, y: np.ndarray, fmt: str
) -> None:
    """slide2vec write_tile_embeddings + hs2p save_tiling_result layout."""
    tiles, emb = root / "tiles", root / "tile_embeddings"
    tiles.mkdir(parents=True, exist_ok=True)
    emb.mkdir(parents=True, exist_ok=True)
    n = len(x)
    np.savez_compressed(
        tiles / f"{sid}.coordinates.npz",
        tile_index=np.arange(n, dtype=np.int32),
        x=x.astype(np.int64),
        y=y.astype(np.int64),
        tissue_fractions=np.ones(n, np.float32),
    )
    if fmt == "pt":
        torch.save(torch.from_numpy(feats).half(), emb / f"{sid}.pt")
    else:
        np.savez_compressed(
            emb / f"{sid}.npz", features=feats, tile_index=np.arange(n)[::-1].copy()
        )
    meta = {
        "sample_id": sid, "artifact_type": "tile_embeddings", "format": fmt, "feature_dim": feats.shape[1],
        "num_tiles": n, "encoder_name": "uni", "feature_dtype": "fp16" if fmt == "pt" else "fp32",
        "coordinates_npz_path": str(tiles / f"{sid}.coordinates.npz"), "tile_size_lv0": 512, "annotation": None,
    }  # fmt: skip
    (emb / f"{sid}.meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def test_slide2vec_output_pt_and_npz(tmp_path):
    rng = np.random.default_rng(2)
    x, y = (
        np.array([0, 0, 512, 512]),
        np.array([0, 512, 0, 512]),
    )  # hs2p order: x, then y
    f1 = rng.normal(size=(4, 16)).astype(np.float32)
    f2 = rng.normal(size=(4, 16)).astype(np.float32)
    _slide2vec_output(tmp_path, "s1", f1, x, y, "pt")
    _slide2vec_output(tmp_path, "s2", f2, x, y, "npz")
    bags = {
        b.slide_id: b
        for b in _source(
            "slide2vec",
            features_dir=str(tmp_path),
            labels_csv=_labels(tmp_path, ["s1", "s2"]),
        ).load()
    }
    np.testing.assert_array_equal(
        bags["s1"].features.numpy(), f1.astype(np.float16).astype(np.float32)
    )
    np.testing.assert_array_equal(bags["s1"].coords, np.stack([x, y], 1))
    np.testing.assert_array_equal(bags["s2"].features.numpy(), f2)
    # npz rows are in the order of their tile_index (reversed here)
    np.testing.assert_array_equal(bags["s2"].coords, np.stack([x, y], 1)[::-1])
    assert bags["s1"].meta["patch_size_level0"] == [512.0, 512.0]  # tile_size_lv0


def _median_colour_error(bag, coords: np.ndarray, side: int) -> float:
    """Median over patches of |mean colour of the slide at ``coords`` - feature|."""
    import openslide

    slide = openslide.OpenSlide(str(SLIDES / "CMU-1-Small-Region.svs"))
    width, height = slide.dimensions
    errors = []
    for (x, y), feat in zip(coords, bag.features.numpy(), strict=True):
        if x + side > width or y + side > height:
            continue  # TIAToolbox pads patches that cross the border
        region = slide.read_region((round(x), round(y)), 0, (side, side)).convert("RGB")
        errors.append(
            np.abs(np.asarray(region).reshape(-1, 3).mean(0) / 255 - feat).max()
        )
    assert len(errors) > 40
    return float(np.median(errors))


@pytest.mark.shared_data
def test_tiatoolbox_zarr_coordinates_are_level0(tmp_path):
    """Re-read the slide at each level-0 box: its mean colour is the stored feature."""
    if not (SLIDES / "CMU-1-Small-Region.svs").is_file():
        pytest.skip("../shared/data/slides is absent")
    import openslide

    sid = "CMU-1-Small-Region"
    (bag,) = _source(
        "tia_zarr", features_dir=str(FOREIGN / "tia_zarr"), labels_csv=_labels(tmp_path, [sid]),
        resolution=4.0, units="mpp", slides_dir=str(SLIDES),
    ).load()  # fmt: skip
    assert bag.features.shape == (63, 3)
    slide = openslide.OpenSlide(str(SLIDES / f"{sid}.svs"))
    mpp = float(slide.properties["openslide.mpp-x"])
    side = round(32 * 4.0 / mpp)  # the patch's footprint at level 0
    assert _median_colour_error(bag, bag.coords, side) < 0.01
    np.testing.assert_allclose(bag.meta["patch_size_level0"], [32 * 4.0 / mpp] * 2)
    # the coordinates as stored (read-resolution pixels) do not match: the check can fail
    assert _median_colour_error(bag, bag.coords * mpp / 4.0, side) > 0.03


@pytest.mark.shared_data
def test_tiatoolbox_zarr_at_objective_power(tmp_path):
    """DeepFeatureExtractor run at units 'power' (2.5x of a 20x slide)."""
    if not (SLIDES / "CMU-1-Small-Region.svs").is_file():
        pytest.skip("../shared/data/slides is absent")
    sid = "CMU-1-Small-Region"
    common = {
        "features_dir": str(FOREIGN / "tia_zarr_power"),
        "labels_csv": _labels(tmp_path, [sid]), "resolution": 2.5, "units": "power",
    }  # fmt: skip
    (bag,) = _source("tia_zarr", slides_dir=str(SLIDES), **common).load()
    side = 256  # level-0 footprint: 32 px x (20x / 2.5x)
    assert bag.meta["patch_size_level0"] == [256.0, 256.0]
    assert _median_colour_error(bag, bag.coords, side) < 0.01
    assert _median_colour_error(bag, bag.coords / 8, side) > 0.03
    (given,) = _source("tia_zarr", power=20, **common).load()
    np.testing.assert_array_equal(given.coords, bag.coords)
    with pytest.raises(DataError, match=r"units 'power' needs data\.options\.power"):
        _source("tia_zarr", **common)


def test_tia_zarr_needs_the_resolution_of_level0(tmp_path):
    with pytest.raises(DataError, match=r"needs data\.options\.mpp or slides_dir"):
        _source(
            "tia_zarr",
            features_dir=str(FOREIGN / "tia_zarr"),
            labels_csv=_labels(tmp_path, ["x"]),
            resolution=4.0,
        )


def test_heatmap_patch_size_comes_from_the_foreign_bag(tmp_path):
    """Tiles of 512 px laid 256 px apart: the heatmap uses 512, not the step."""
    from tiahnm.evaluation.heatmap import patch_size_level0
    from tiahnm.evaluation.scores import scores_from_bags

    x, y = np.array([0, 256, 512]), np.array([0, 256, 0])
    feats = np.ones((3, 4), np.float32)
    _slide2vec_output(tmp_path, "s1", feats, x, y, "npz")
    bags = _source(
        "slide2vec", features_dir=str(tmp_path), labels_csv=_labels(tmp_path, ["s1"])
    ).load()
    (slide,) = scores_from_bags(bags, [np.zeros(3)], np.array([[0.4, 0.6]]), 0.5)
    assert patch_size_level0(slide) == (512.0, 512.0)
    bags[0].meta.clear()  # without it: the coordinate step
    (slide,) = scores_from_bags(bags, [np.zeros(3)], np.array([[0.4, 0.6]]), 0.5)
    assert patch_size_level0(slide) == (256.0, 256.0)


def test_slide2vec_annotation_subfolder_and_hs2p_format_2(tmp_path):
    """tile_embeddings/<class>/ of an annotation run; hs2p 'coordinates' [N, 2]."""
    rng = np.random.default_rng(3)
    xy = np.array([[0, 0], [448, 0], [0, 448]], dtype=np.int64)
    feats = rng.normal(size=(3, 8)).astype(np.float32)
    tiles = tmp_path / "elsewhere"  # recorded in the embedding metadata
    tiles.mkdir()
    np.savez_compressed(
        tiles / "s1.coordinates.npz", tile_index=np.arange(3, dtype=np.int32),
        coordinates=xy, tissue_fractions=np.ones(3, np.float32),
    )  # fmt: skip
    (tiles / "s1.coordinates.meta.json").write_text(
        json.dumps({"format_version": 2, "tiling": {"tile_size_lv0": 448}})
    )
    emb = tmp_path / "tile_embeddings" / "tumor"
    emb.mkdir(parents=True)
    np.savez_compressed(emb / "s1.npz", features=feats, tile_index=np.arange(3))
    meta = {
        "sample_id": "s1", "artifact_type": "tile_embeddings", "format": "npz",
        "feature_dim": 8, "num_tiles": 3, "encoder_name": "uni", "annotation": "tumor",
        "coordinates_npz_path": str(tiles / "s1.coordinates.npz"),
    }  # fmt: skip
    (emb / "s1.meta.json").write_text(json.dumps(meta))
    labels = _labels(tmp_path, ["s1"])
    (bag,) = _source(
        "slide2vec", features_dir=str(tmp_path), labels_csv=labels, annotation="tumor"
    ).load()
    np.testing.assert_array_equal(bag.features.numpy(), feats)
    np.testing.assert_array_equal(bag.coords, xy)
    # no tile_size_lv0 in the embedding metadata: hs2p's, beside the coordinates
    assert bag.meta["patch_size_level0"] == [448.0, 448.0]
    with pytest.raises(DataError, match="has no slide2vec feature file"):
        _source("slide2vec", features_dir=str(tmp_path), labels_csv=labels).load()
    with pytest.raises(DataError, match="must be a class folder name"):
        _source(
            "slide2vec",
            features_dir=str(tmp_path),
            labels_csv=labels,
            annotation="../x",
        )
