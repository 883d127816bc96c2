"""Contract tests run on every registered bag source.

A bag source reads a dataset into :class:`tiahnm.data.Bag` records. Every built-in
source has a small dataset written here in its own format (``DATASETS``; a new
built-in without one fails ``test_every_builtin_source_has_a_dataset``), and each must:
reject unknown options by name; return real, uniquely named bags with ``[N, D]``
finite float32 features of one width, integer labels, and coordinates / instance
labels (when given) with one row per instance; read the same bags twice; and name the
file when the data is missing.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.test_foreign import (
    FOREIGN,
    _clam_save_hdf5,
    _grid,
    _slide2vec_output,
    _stamp_file,
)
from tests.synthetic import make_bags, write_mil_csv
from tiahnm.data.bag import Bag, BagSource
from tiahnm.demo.slides import SlideSpec, draw_slide, write_pyramid_tiff
from tiahnm.errors import ConfigError, DataError
from tiahnm.plugins import get_registry


def h5_folder(root: Path) -> dict:
    feats = root / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate((5, 3, 4)):
        with h5py.File(feats / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(n, 6)).astype(np.float32)
            f["coords"] = np.arange(2 * n).reshape(n, 2) * 256
    (root / "labels.csv").write_text("slide_id,label\ns0,0\ns1,1\ns2,1\n")
    return {"features_dir": str(feats), "labels_csv": str(root / "labels.csv")}


def mil_csv(root: Path) -> dict:
    write_mil_csv(root / "bags.csv", make_bags(6, dim=5))
    return {"path": str(root / "bags.csv")}


def mnist_bags(root: Path) -> dict:
    rng = np.random.default_rng(0)
    with gzip.open(root / "mnist.csv.gz", "wt") as fh:
        for digit in range(10):
            for _ in range(6):
                fh.write(",".join(map(str, [*rng.integers(0, 256, 784), digit])) + "\n")
    return {"path": str(root / "mnist.csv.gz"), "n_bags": 6, "mean_bag_size": 4.0}


def image_patches(root: Path) -> dict:
    rng = np.random.default_rng(0)
    for name in ("one", "two", "three"):
        image = rng.integers(0, 180, size=(24, 36, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"{name}.png")
    (root / "labels.csv").write_text(
        "image,malignant\none.png,1\ntwo.png,0\nthree.png,1\n"
    )
    return {"root": str(root), "labels_csv": str(root / "labels.csv"), "patch_size": 12}


def slide_patches(root: Path) -> dict:
    for i in range(2):
        spec = SlideSpec(f"s{i}", 192, 160, tumour=i == 1, seed=i)
        write_pyramid_tiff(
            root / f"s{i}.tif", draw_slide(spec).image, mpp=1.0, levels=2
        )
    (root / "labels.csv").write_text("slide_id,label\ns0,0\ns1,1\n")
    return {
        "slides": str(root),
        "labels_csv": str(root / "labels.csv"),
        "resolution": 1.0,
        "units": "baseline",
        "patch_size": 16,
        "max_patches": 12,
    }


def _two_labels(root: Path) -> str:
    (root / "labels.csv").write_text("slide_id,label\ns0,0\ns1,1\n")
    return str(root / "labels.csv")


def clam_pt(root: Path) -> dict:
    (root / "pt_files").mkdir()
    (root / "h5_files").mkdir()
    rng = np.random.default_rng(0)
    for sid, n in (("s0", 4), ("s1", 3)):
        feats = rng.normal(size=(n, 8)).astype(np.float32)
        _clam_save_hdf5(
            root / "h5_files" / f"{sid}.h5", {"features": feats, "coords": _grid(n)}
        )
        torch.save(torch.from_numpy(feats), root / "pt_files" / f"{sid}.pt")
    return {"features_dir": str(root / "pt_files"), "labels_csv": _two_labels(root)}


def stamp_h5(root: Path) -> dict:
    rng = np.random.default_rng(1)
    for sid in ("s0", "s1"):
        coords_um = (_grid(3) * 0.5).astype(np.float32)
        _stamp_file(
            root / f"{sid}.h5",
            rng.normal(size=(3, 8)).astype(np.float32),
            coords_um,
            "uni",
        )
    return {"features_dir": str(root), "labels_csv": _two_labels(root), "mpp": 0.5}


def slide2vec(root: Path) -> dict:
    rng = np.random.default_rng(2)
    x, y = np.array([0, 0, 512]), np.array([0, 512, 0])
    for sid, fmt in (("s0", "pt"), ("s1", "npz")):
        _slide2vec_output(
            root, sid, rng.normal(size=(3, 8)).astype(np.float32), x, y, fmt
        )
    return {"features_dir": str(root), "labels_csv": _two_labels(root)}


def tia_zarr(root: Path) -> dict:
    # the DeepFeatureExtractor output committed under tests/data/foreign, twice
    source = FOREIGN / "tia_zarr" / "CMU-1-Small-Region.zarr"
    for sid in ("s0", "s1"):
        shutil.copytree(source, root / f"{sid}.zarr")
    return {
        "features_dir": str(root),
        "labels_csv": _two_labels(root),
        "resolution": 4.0,
        "units": "mpp",
        "mpp": 0.499,
    }


# name -> writes a small dataset under the given folder and returns the options
DATASETS: dict[str, Callable[[Path], dict]] = {
    "h5_folder": h5_folder,
    "mil_csv": mil_csv,
    "mnist_bags": mnist_bags,
    "image_patches": image_patches,
    "slide_patches": slide_patches,
    "clam_pt": clam_pt,
    "stamp_h5": stamp_h5,
    "slide2vec": slide2vec,
    "tia_zarr": tia_zarr,
}
# The option naming the data: pointed at a missing path, loading must name it.
DATA_OPTION = {
    "h5_folder": "features_dir",
    "mil_csv": "path",
    "mnist_bags": "path",
    "image_patches": "root",
    "slide_patches": "slides",
    "clam_pt": "features_dir",
    "stamp_h5": "features_dir",
    "slide2vec": "features_dir",
    "tia_zarr": "features_dir",
}
SOURCE_NAMES = sorted(get_registry("bag_source"))
TESTED = sorted(set(SOURCE_NAMES) & set(DATASETS))


def build(name: str, folder: Path, /, **extra) -> BagSource:
    options = {**DATASETS[name](folder), **extra}
    return get_registry("bag_source").create(name, key="data.options", **options)


def test_every_builtin_source_has_a_dataset():
    builtin = [
        n for n in SOURCE_NAMES if get_registry("bag_source")[n].package == "tiahnm"
    ]
    assert set(builtin) <= set(DATASETS), set(builtin) - set(DATASETS)


@pytest.mark.parametrize("name", TESTED)
def test_unknown_option_is_named(name, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.options\.no_such_option"):
        build(name, tmp_path, no_such_option=1)


@pytest.mark.parametrize("name", TESTED)
def test_bags_follow_the_record_contract(name, tmp_path):
    source = build(name, tmp_path)
    assert isinstance(source, BagSource)
    bags = source.load()
    assert len(bags) >= 2
    assert len({b.slide_id for b in bags}) == len(bags)
    widths = {b.features.shape[1] for b in bags}
    assert len(widths) == 1
    for bag in bags:
        assert isinstance(bag, Bag)
        assert bag.origin == "real"
        assert isinstance(bag.label, int) and not isinstance(bag.label, bool)
        assert bag.label >= 0
        assert bag.features.dtype == torch.float32
        assert bag.features.dim() == 2 and bag.n_instances >= 1
        assert torch.isfinite(bag.features).all()
        if bag.coords is not None:
            assert np.asarray(bag.coords).shape == (bag.n_instances, 2)
        if bag.instance_labels is not None:
            assert np.asarray(bag.instance_labels).shape == (bag.n_instances,)
    assert {b.label for b in bags} == {0, 1}


@pytest.mark.parametrize("name", TESTED)
def test_reads_the_same_bags_twice(name, tmp_path):
    source = build(name, tmp_path)
    first, second = source.load(), source.load()
    assert [b.slide_id for b in first] == [b.slide_id for b in second]
    for a, b in zip(first, second, strict=True):
        assert a.label == b.label
        assert torch.equal(a.features, b.features)
        assert (a.coords is None) == (b.coords is None)
        if a.coords is not None:
            assert np.array_equal(a.coords, b.coords)


@pytest.mark.parametrize("name", TESTED)
def test_missing_data_names_the_path(name, tmp_path):
    missing = tmp_path / "no_such_data"
    source = build(name, tmp_path, **{DATA_OPTION[name]: str(missing)})
    with pytest.raises(DataError, match="no_such_data"):
        source.load()
