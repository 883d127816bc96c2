import gzip

import numpy as np
import pytest
import torch

from tiahnm.data.mnist_bags import MNISTBags, read_mnist_csv
from tiahnm.errors import DataError


def fake_mnist(path, n_per_digit=20):
    rng = np.random.default_rng(0)
    rows = []
    for d in range(10):
        for _ in range(n_per_digit):
            rows.append([*rng.integers(0, 256, 784).tolist(), d])
    with gzip.open(path, "wt") as fh:
        for r in rows:
            fh.write(",".join(map(str, r)) + "\n")


def test_balanced_bags_labels_and_sizes(tmp_path):
    p = tmp_path / "m.csv.gz"
    fake_mnist(p)
    bags = MNISTBags(str(p), n_bags=40, mean_bag_size=10, std_bag_size=2, seed=1).load()
    assert len(bags) == 40
    assert sum(b.label for b in bags) == 20
    for b in bags:
        assert b.label == int(b.instance_labels.any())
        assert b.label == int(9 in b.meta["digits"])
        assert b.features.shape == (b.n_instances, 784)
        assert 0.0 <= float(b.features.min()) and float(b.features.max()) <= 1.0
    sizes = [b.n_instances for b in bags]
    assert 7 <= np.mean(sizes) <= 13
    again = MNISTBags(str(p), n_bags=40, seed=1).load()
    assert [b.meta["digits"] for b in again] == [b.meta["digits"] for b in bags]


def test_images_layout(tmp_path):
    p = tmp_path / "m.csv.gz"
    fake_mnist(p)
    images = MNISTBags(str(p), n_bags=2, as_images=True).load()
    flat = MNISTBags(str(p), n_bags=2).load()
    assert images[0].features.shape[1:] == (1, 28, 28)
    # the same bags; each image is its 784 pixels in row-major order
    pixels, digits = read_mnist_csv(p)
    digit_of = {r.tobytes(): int(d) for r, d in zip(pixels, digits, strict=True)}
    for img, row in zip(images, flat, strict=True):
        assert (img.slide_id, img.label) == (row.slide_id, row.label)
        assert img.meta["digits"] == row.meta["digits"]
        assert torch.equal(img.features, row.features.reshape(-1, 1, 28, 28))
        # image [k, 0, r, c] is pixel 28 r + c of a CSV row, scaled to [0, 1]
        for k, image in enumerate(img.features):
            raw = np.rint(image.numpy()[0] * 255).astype(np.uint8).reshape(784)
            assert digit_of[raw.tobytes()] == img.meta["digits"][k]


def test_bad_file(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("1,2,3\n")
    with pytest.raises(DataError, match="expected 785 columns"):
        read_mnist_csv(p)


def test_real_mnist_5k(shared_data):
    bags = MNISTBags(
        str(shared_data / "mnist-5k" / "mnist_5k.csv.gz"),
        n_bags=100,
        mean_bag_size=50,
        std_bag_size=10,
    ).load()
    assert sum(b.label for b in bags) == 50
    assert 40 <= np.mean([b.n_instances for b in bags]) <= 60


def test_hard_negative_digits(tmp_path):
    p = tmp_path / "m.csv.gz"
    fake_mnist(p, n_per_digit=40)
    plain = MNISTBags(str(p), n_bags=20, seed=2).load()
    hard = MNISTBags(
        str(p), n_bags=20, seed=2, hard_digits=[4, 7], hard_fraction=0.5
    ).load()
    for b in hard:
        digits = np.array(b.meta["digits"])
        n_hard = round(0.5 * len(digits))
        placed = int((digits == 9).sum())  # targets may replace hard digits
        assert n_hard - placed <= np.isin(digits, [4, 7]).sum() <= n_hard
        assert b.label == int(placed > 0)
    assert [b.label for b in hard] == [b.label for b in plain]
    share = np.mean([np.isin(b.meta["digits"], [4, 7]).mean() for b in plain])
    assert share < 0.35  # without the option: about 2/9 of the digits
    for kw, match in (
        ({"hard_digits": [9], "hard_fraction": 0.5}, "must not hold the target"),
        ({"hard_fraction": 0.5}, "needs hard_digits"),
        ({"hard_digits": [4], "hard_fraction": 1.5}, r"in \[0, 1\]"),
    ):
        with pytest.raises(DataError, match=match):
            MNISTBags(str(p), **kw)
