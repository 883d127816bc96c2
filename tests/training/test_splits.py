import numpy as np
import pytest

from tiahnm.errors import ConfigError, DataError
from tiahnm.training.splits import (
    fixed_split,
    kfold_splits,
    read_split_file,
    write_split_file,
)


def test_kfold_partitions_and_stratifies():
    labels = [0] * 30 + [1] * 20
    folds = kfold_splits(labels, folds=5, repeats=2, val_fraction=0.2, seed=0)
    assert len(folds) == 10
    for r in range(2):
        tests = [i for f in folds if f.repeat == r for i in f.test]
        assert sorted(tests) == list(
            range(50)
        )  # every bag tested exactly once per repeat
    for f in folds:
        assert not set(f.train) & set(f.test)
        assert not set(f.val) & set(f.test)
        assert not set(f.train) & set(f.val)
        assert len(f.train) + len(f.val) + len(f.test) == 50
        y = np.asarray(labels)
        assert set(y[list(f.val)]) == {0, 1}
        assert sum(y[list(f.test)]) == 4
    assert [f.test for f in folds if f.repeat == 0] != [
        f.test for f in folds if f.repeat == 1
    ]


def test_kfold_deterministic():
    labels = [0, 1] * 20
    a = kfold_splits(labels, folds=4, repeats=1, val_fraction=0.1, seed=3)
    b = kfold_splits(labels, folds=4, repeats=1, val_fraction=0.1, seed=3)
    assert a == b


def test_too_many_folds_for_class():
    with pytest.raises(ConfigError, match="smallest class"):
        kfold_splits([0] * 10 + [1] * 3, folds=5, repeats=1, val_fraction=0.1, seed=0)


def test_fixed_split():
    (f,) = fixed_split(["train", "val", "test", "train"])
    assert f.train == (0, 3) and f.val == (1,) and f.test == (2,)
    with pytest.raises(DataError):
        fixed_split(["train", "val"])


def test_split_file_round_trip(tmp_path):
    ids = [f"s{i}" for i in range(12)]
    folds = kfold_splits([0, 1] * 6, folds=3, repeats=2, val_fraction=0.2, seed=1)
    write_split_file(tmp_path / "splits.csv", folds, ids)
    again = read_split_file(tmp_path / "splits.csv", ids)
    assert [
        (f.repeat, f.fold, sorted(f.train), sorted(f.val), sorted(f.test))
        for f in again
    ] == [
        (f.repeat, f.fold, sorted(f.train), sorted(f.val), sorted(f.test))
        for f in folds
    ]


def test_split_file_unknown_slide(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("slide_id,repeat,fold,split\nzzz,0,0,train\n")
    with pytest.raises(DataError, match=r"row 2: unknown slide_id 'zzz'"):
        read_split_file(p, ["a"])


def test_split_file_overlaps(tmp_path, caplog):
    p = tmp_path / "s.csv"
    p.write_text("slide_id,repeat,fold,split\na,0,0,train\nb,0,0,test\nb,0,0,val\n")
    read_split_file(p, ["a", "b"])
    assert "both val and test" in caplog.text
    p.write_text("slide_id,repeat,fold,split\na,0,0,train\na,0,0,test\n")
    with pytest.raises(DataError, match="both train and test"):
        read_split_file(p, ["a"])
