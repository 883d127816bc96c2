import h5py
import numpy as np
import pytest

from tiahnm.data.h5_features import H5FeatureFolder, read_feature_file, read_labels_csv
from tiahnm.errors import DataError


def make_h5(path, n=5, d=4, *, batch_axis=False, coords=True, value=None):
    feats = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    if value is not None:
        feats[0, 0] = value
    with h5py.File(path, "w") as f:
        f["features"] = feats[None] if batch_axis else feats
        if coords:
            c = np.arange(n * 2).reshape(n, 2)
            f["coords"] = c[None] if batch_axis else c
    return feats


def folder(tmp_path, labels="slide_id,label\na,0\nb,1\n"):
    fd = tmp_path / "feats"
    fd.mkdir()
    make_h5(fd / "a.h5")
    make_h5(fd / "b.h5", n=3, batch_axis=True)
    csv = tmp_path / "labels.csv"
    csv.write_text(labels)
    return fd, csv


def test_reads_clam_and_trident_layouts(tmp_path):
    fd, csv = folder(tmp_path)
    bags = H5FeatureFolder(str(fd), str(csv)).load()
    assert [b.slide_id for b in bags] == ["a", "b"]
    assert bags[0].features.shape == (5, 4) and bags[1].features.shape == (3, 4)
    assert bags[1].coords.shape == (3, 2)
    assert bags[0].split is None


def test_class_names_and_split(tmp_path):
    fd, csv = folder(tmp_path, "slide_id,label,split\na,normal,train\nb,tumor,test\n")
    bags = H5FeatureFolder(str(fd), str(csv), classes=["normal", "tumor"]).load()
    assert [b.label for b in bags] == [0, 1]
    assert [b.split for b in bags] == ["train", "test"]


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ("slide_id,label\na,0\na,1\n", "row 3: duplicate slide_id 'a'"),
        ("slide_id,label\na,\n", "row 2: missing label for 'a'"),
        ("slide_id,lab\na,0\n", "missing column 'label'"),
        ("slide_id,label,split\na,0,training\n", "split 'training' is not one of"),
        ("slide_id,label\na,0\nc,1\n", "slide 'c' has no feature file"),
    ],
)
def test_label_csv_errors(tmp_path, labels, fragment):
    fd, csv = folder(tmp_path, labels)
    with pytest.raises(DataError) as info:
        H5FeatureFolder(str(fd), str(csv)).load()
    assert fragment in str(info.value)


def test_label_outside_classes(tmp_path):
    _, csv = folder(tmp_path, "slide_id,label\na,normal\nb,lymph\n")
    with pytest.raises(
        DataError, match="label 'lymph' of slide 'b' is not one of the classes"
    ):
        read_labels_csv(csv, classes=["normal", "tumor"])


def test_missing_skip(tmp_path, caplog):
    fd, csv = folder(tmp_path, "slide_id,label\na,0\nb,1\nc,1\n")
    with caplog.at_level("WARNING"):
        bags = H5FeatureFolder(str(fd), str(csv), missing="skip").load()
    assert [(b.slide_id, b.label) for b in bags] == [("a", 0), ("b", 1)]
    np.testing.assert_array_equal(bags[0].features.numpy(), make_h5(tmp_path / "x.h5"))
    assert "c" in caplog.text  # the skipped slide is named
    with pytest.raises(DataError, match="c"):
        H5FeatureFolder(str(fd), str(csv), missing="error").load()


def test_bad_feature_files(tmp_path):
    bad = tmp_path / "nan.h5"
    make_h5(bad, value=np.nan)
    with pytest.raises(DataError, match=r"nan\.h5: 'features' contains NaN"):
        read_feature_file(bad)
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f["features"] = np.zeros((0, 4), np.float32)
    with pytest.raises(DataError, match="empty bag"):
        read_feature_file(empty)
    nofeat = tmp_path / "nofeat.h5"
    with h5py.File(nofeat, "w") as f:
        f["feats"] = np.zeros((2, 4), np.float32)
    with pytest.raises(DataError, match="no 'features' dataset"):
        read_feature_file(nofeat)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="unreadable HDF5"):
        read_feature_file(junk)
    mismatch = tmp_path / "mm.h5"
    with h5py.File(mismatch, "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(DataError, match="'coords' shape"):
        read_feature_file(mismatch)


def test_width_mismatch_names_file(tmp_path):
    fd, csv = folder(tmp_path)
    make_h5(fd / "b.h5", d=7)
    with pytest.raises(
        DataError,
        match=r"mix feature widths \(4: 1 file\(s\) .*a\.h5; 7: 1 file\(s\) .*b\.h5\)",
    ):
        H5FeatureFolder(str(fd), str(csv)).load()
