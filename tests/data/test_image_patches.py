"""image_patches bag source on small generated PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tiahnm.data.image_patches import ImagePatchBags, background_mask, tile_image
from tiahnm.errors import DataError
from tiahnm.plugins import get_registry


def write_png(path, arr):
    Image.fromarray(arr).save(path)


@pytest.fixture
def folder(tmp_path):
    # 40 x 24 RGB: 3 x 2 patches of 12 px (x = 36..39 and nothing below 24 are dropped)
    a = np.full((24, 40, 3), 255, dtype=np.uint8)
    a[0:12, 0:12] = (200, 100, 50)  # tissue
    a[12:24, 12:24] = (10, 20, 30)  # tissue
    a[0:12, 24:36, :] = 230  # near-white everywhere: dropped
    a[0:6, 12:24] = (90, 90, 90)  # half tissue, half white: kept at fraction 0.5
    write_png(tmp_path / "one.png", a)
    b = np.zeros((12, 12, 3), dtype=np.uint8)
    write_png(tmp_path / "two.png", b)
    (tmp_path / "labels.csv").write_text("image,malignant\none.png,1\ntwo.png,0\n")
    return tmp_path


def test_bags_patches_coords_and_labels(folder):
    bags = ImagePatchBags(str(folder), patch_size=12).load()
    assert [b.slide_id for b in bags] == ["one", "two"]
    assert [b.label for b in bags] == [1, 0]
    one = bags[0]
    # grid (x, y): (0,0) (12,0) (24,0) (0,12) (12,12) (24,12); white ones dropped
    assert one.coords.tolist() == [[0, 0], [12, 0], [12, 12]]
    assert one.features.shape == (3, 3 * 12 * 12)
    assert one.features.dtype.is_floating_point
    patches = one.features.reshape(3, 3, 12, 12)
    assert patches[0, :, 0, 0].tolist() == pytest.approx(
        [200 / 255, 100 / 255, 50 / 255]
    )
    assert patches[2, :, 5, 5].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    assert one.meta["image_shape"] == [3, 12, 12] and one.meta["n_dropped"] == 3
    assert bags[1].features.shape == (1, 432) and float(bags[1].features.max()) == 0.0


def test_threshold_options_and_registry(folder):
    strict = get_registry("bag_source").create(
        "image_patches", root=str(folder), patch_size=12, max_white_fraction=0.4
    )
    assert strict.load()[0].coords.tolist() == [[0, 0], [12, 12]]
    # mean-intensity rule: the 230-grey patch is not "near-white" at level 240
    grey = ImagePatchBags(str(folder), patch_size=12, white_level=240)
    assert [24, 0] in grey.load()[0].coords.tolist()
    by_mean = ImagePatchBags(
        str(folder), patch_size=12, white_level=240, max_mean_intensity=200
    )
    assert [24, 0] not in by_mean.load()[0].coords.tolist()
    grey_mode = ImagePatchBags(str(folder), patch_size=12, mode="L").load()
    assert grey_mode[0].features.shape[1] == 144


def test_custom_columns_and_stride(tmp_path):
    # 8 x 10 (h x w), every pixel distinct and dark (never dropped as background)
    pixels = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3) % 200
    write_png(tmp_path / "x.png", pixels)
    write_png(tmp_path / "z.png", np.zeros((4, 4, 3), dtype=np.uint8))
    (tmp_path / "lab.csv").write_text("file,y\nx.png,1\nz.png,0\n")
    bags = ImagePatchBags(
        str(tmp_path),
        labels_csv=str(tmp_path / "lab.csv"),
        image_column="file",
        label_column="y",
        patch_size=4,
        stride=2,
    ).load()
    assert [(b.slide_id, b.label) for b in bags] == [("x", 1), ("z", 0)]
    x = bags[0]
    # top-left corners (x, y) every 2 px, row-major: 4 columns x 3 rows
    want = [[cx, cy] for cy in (0, 2, 4) for cx in (0, 2, 4, 6)]
    assert x.coords.tolist() == want
    # each patch holds the pixels under its corner, channel-major, scaled to [0, 1]
    got = x.features.reshape(len(want), 3, 4, 4).numpy()
    for patch, (cx, cy) in zip(got, want, strict=True):
        crop = pixels[cy : cy + 4, cx : cx + 4].transpose(2, 0, 1) / 255.0
        np.testing.assert_allclose(patch, crop, atol=1e-6)
    assert bags[1].coords.tolist() == [[0, 0]]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"labels\.csv: labels CSV not found"):
        ImagePatchBags(str(tmp_path)).load()
    (tmp_path / "labels.csv").write_text("image,label\na.png,1\n")
    with pytest.raises(DataError, match="no column 'malignant'"):
        ImagePatchBags(str(tmp_path)).load()
    (tmp_path / "labels.csv").write_text("image,malignant\na.png,yes\n")
    with pytest.raises(DataError, match="row 2: label 'yes'"):
        ImagePatchBags(str(tmp_path)).load()
    (tmp_path / "labels.csv").write_text("image,malignant\na.png,1\n")
    with pytest.raises(DataError, match=r"a\.png: image listed"):
        ImagePatchBags(str(tmp_path)).load()
    (tmp_path / "a.png").write_text("not a png")
    with pytest.raises(DataError, match=r"a\.png: not a readable image"):
        ImagePatchBags(str(tmp_path)).load()
    write_png(tmp_path / "a.png", np.full((8, 8, 3), 255, dtype=np.uint8))
    with pytest.raises(DataError, match=r"a\.png: no 4px patch left"):
        ImagePatchBags(str(tmp_path), patch_size=4).load()
    with pytest.raises(DataError, match="mode"):
        ImagePatchBags(str(tmp_path), mode="CMYK")


def test_tile_and_mask_helpers():
    img = np.arange(5 * 7 * 1, dtype=np.uint8).reshape(5, 7, 1)
    patches, coords = tile_image(img, 3)
    assert coords.tolist() == [[0, 0], [3, 0]]
    assert patches[1, :, :, 0].tolist() == img[0:3, 3:6, 0].tolist()
    assert background_mask(np.zeros((0, 3, 3, 3), np.uint8)).shape == (0,)


def test_real_ucsb_images(shared_data, tmp_path):
    root = shared_data / "ucsb-breast-tma"
    if not root.is_dir():
        pytest.skip("ucsb-breast-tma not in ../shared/data")
    lines = (root / "labels.csv").read_text().splitlines()
    assert lines[0] == "image,malignant" and len(lines) == 59
    (tmp_path / "three.csv").write_text("\n".join(lines[:2] + lines[4:6]) + "\n")
    bags = ImagePatchBags(str(root), labels_csv=str(tmp_path / "three.csv")).load()
    assert [b.label for b in bags] == [0, 1, 1]
    # 896 x 768 in 32 px patches: a 28 x 24 grid, white background dropped
    assert all(0 < b.n_instances < 28 * 24 for b in bags)
    assert all(b.n_instances + b.meta["n_dropped"] == 28 * 24 for b in bags)
    assert bags[0].features.shape[1] == 3 * 32 * 32
