"""Tasks through cross-validation: survival, multi-class, patients, bad inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from tiahnm.config import from_dict
from tiahnm.crossval import make_folds, run_training
from tiahnm.data.bag import Bag
from tiahnm.data.cohort import check_patient_labels, read_cohort_columns
from tiahnm.errors import ConfigError, DataError
from tiahnm.training.splits import check_grouping, kfold_splits


def survival_bags(n: int = 40, seed: int = 0) -> list[Bag]:
    """Risk rises with the count of shifted instances; exponential times, censoring."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        k = int(rng.integers(0, 4))
        x = rng.normal(size=(6, 4)).astype(np.float32)
        x[:k, 0] += 3.0
        t_event = rng.exponential(1.0 / np.exp(0.8 * k))
        t_cens = rng.exponential(2.0)
        bags.append(
            Bag(
                slide_id=f"s{i:02d}",
                label=int(t_event <= t_cens),
                features=torch.from_numpy(x),
                time=float(min(t_event, t_cens)),
                event=int(t_event <= t_cens),
            )
        )
    return bags


def base_config(tmp_path, **extra) -> dict:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "head": {"name": "abmil", "options": {"embed_dim": 8}},
        "train": {"epochs": 3, "progress": False, "batch_size": 4, "lr": 1e-3},
        "cv": {"folds": 2, "val_fraction": 0.25},
        "evaluation": {"bootstrap": 20, "report": False},
    }
    for k, v in extra.items():
        cfg[k] = v if not isinstance(v, dict) else {**cfg.get(k, {}), **v}
    return cfg


@pytest.mark.parametrize(
    ("loss", "monitor"), [("nll", "val_c_index"), ("cox", "val_loss")]
)
def test_survival_cv_writes_c_index_and_risks(
    tmp_path, loss: str, monitor: str
) -> None:
    cfg = from_dict(
        base_config(
            tmp_path,
            task={"name": "survival", "options": {"loss": loss}},
            train={"monitor": monitor},
        )
    )
    summary = run_training(cfg, bags=survival_bags())
    c = summary["metrics"]["c_index"]
    assert 0.0 <= c["mean"] <= 1.0
    assert c["ci95"][0] <= c["pooled"] <= c["ci95"][1]
    assert summary["task"]["loss"] == loss
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions.csv")))
    assert {"risk", "time", "event", "high_risk"} <= set(rows[0])
    assert len(rows) == 40
    best = torch.load(tmp_path / "run/folds/r0_f0/best.pt", weights_only=False)
    assert best["n_classes"] == (4 if loss == "nll" else 2)


def test_multiclass_cv_macro_auc_kappa_and_val_auc(tmp_path) -> None:
    rng = np.random.default_rng(0)
    bags = []
    for i in range(30):
        y = i % 3
        x = rng.normal(size=(5, 4)).astype(np.float32)
        x[:2, y] += 3.0
        bags.append(Bag(f"b{i}", y, torch.from_numpy(x)))
    cfg = from_dict(
        base_config(
            tmp_path,
            task={"name": "multiclass", "options": {"ordinal": True}},
            train={"monitor": "val_auc", "epochs": 4},
        )
    )
    summary = run_training(cfg, bags=bags)
    m = summary["metrics"]
    assert {"auc", "kappa", "balanced_accuracy", "auc_class2", "recall_class1"} <= set(
        m
    )
    assert "ci95" in m["auc"] and "ci95" in m["kappa"]
    assert summary["task"]["kappa_weights"] == "quadratic"
    hist = json.loads((tmp_path / "run/folds/r0_f0/result.json").read_text())["history"]
    assert all(np.isfinite(row["val_auc"]) for row in hist)


def test_unsupported_miner_task_names_both(tmp_path) -> None:
    cfg = from_dict(
        base_config(tmp_path, task={"name": "survival"}, miner={"name": "li2019"})
    )
    with pytest.raises(ConfigError, match=r"li2019.*survival"):
        run_training(cfg, bags=survival_bags())
    assert not (tmp_path / "run" / "folds").exists()


def test_monitor_must_fit_the_task(tmp_path) -> None:
    cfg = from_dict(
        base_config(tmp_path, task={"name": "survival"}, train={"monitor": "val_auc"})
    )
    with pytest.raises(ConfigError, match=r"val_auc.*survival"):
        run_training(cfg, bags=survival_bags())


def test_survival_bad_bags_are_data_errors(tmp_path) -> None:
    bags = survival_bags()
    bags[3].time = float("nan")
    cfg = from_dict(base_config(tmp_path, task={"name": "survival"}))
    with pytest.raises(DataError, match="s03"):
        run_training(cfg, bags=bags)


def cohort(n_patients: int = 40, seed: int = 0) -> list[Bag]:
    rng = np.random.default_rng(seed)
    bags = []
    for p in range(n_patients):
        label = p % 2
        for s in range(int(rng.integers(1, 5))):
            bags.append(
                Bag(f"p{p:02d}_s{s}", label, torch.zeros(2, 3), patient_id=f"P{p:02d}")
            )
    return bags


def test_no_patient_shared_between_train_val_test() -> None:
    bags = cohort()
    groups = [b.patient_id for b in bags]
    folds = kfold_splits(
        [b.label for b in bags],
        folds=5,
        repeats=5,
        val_fraction=0.2,
        seed=0,
        groups=groups,
    )
    assert len(folds) == 25
    for f in folds:
        parts = [{groups[i] for i in idx} for idx in (f.train, f.val, f.test)]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2])
        assert not (parts[1] & parts[2])
        assert parts[1], "every fold has validation patients"
        assert sorted([*f.train, *f.val, *f.test]) == list(range(len(bags)))


def test_user_split_file_leak_names_patient_and_fold(tmp_path) -> None:
    bags = cohort(6)
    path = tmp_path / "splits.csv"
    with path.open("w") as fh:
        fh.write("slide_id,repeat,fold,split\n")
        for i, b in enumerate(bags):
            split = "test" if i == 0 else "train"
            fh.write(f"{b.slide_id},0,0,{split}\n")
    cfg = from_dict({"cv": {"split_file": str(path)}})
    leaky = bags[0].patient_id
    n_same = sum(b.patient_id == leaky for b in bags)
    if n_same == 1:  # make sure patient P00 has a second slide in train
        bags[1].patient_id = leaky
    with pytest.raises(DataError, match=f"fold r0_f0 puts patient '{leaky}'"):
        make_folds(cfg, bags)


def test_check_grouping_passes_clean_folds() -> None:
    bags = cohort(10)
    groups = [b.patient_id for b in bags]
    folds = kfold_splits(
        [b.label for b in bags],
        folds=2,
        repeats=1,
        val_fraction=0.2,
        seed=1,
        groups=groups,
    )
    check_grouping(folds, groups, where="x")


def test_conflicting_patient_labels_name_patient_and_rows() -> None:
    bags = cohort(3)
    bags[1].patient_id = bags[0].patient_id
    bags[1].label = 1 - bags[0].label
    bags[0].meta["row"], bags[1].meta["row"] = 2, 3
    with pytest.raises(DataError, match=r"patient .P00.*row 2.*row 3"):
        check_patient_labels(bags)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("s1,1,P1,-2,1", "row 3.*'time'"),
        ("s1,1,P1,nan,1", "row 3.*'time'"),
        ("s1,1,P1,,1", "row 3.*'time'"),
        ("s1,1,P1,3,2", "row 3.*'event'"),
        ("s1,1,,3,1", "row 3.*empty 'patient_id'"),
    ],
)
def test_cohort_csv_bad_values(tmp_path, row: str, match: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(f"slide_id,label,patient_id,time,event\ns0,0,P0,1.5,0\n{row}\n")
    with pytest.raises(DataError, match=match):
        read_cohort_columns(path)


def test_case_id_is_a_patient_column(tmp_path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,case_id\ns0,0,C1\ns1,0,C1\n")
    rows = read_cohort_columns(path)
    assert rows["s1"].patient_id == "C1" and rows["s1"].row == 3


def test_patient_bag_level_and_patient_metrics(tmp_path) -> None:
    rng = np.random.default_rng(0)
    bags = cohort(16)
    for b in bags:
        x = rng.normal(size=(4, 3)).astype(np.float32)
        x[:, 0] += 2.0 * b.label
        b.features = torch.from_numpy(x)
    summary = run_training(from_dict(base_config(tmp_path)), bags=bags)
    assert "auc" in summary["patient_metrics"]
    cfg = from_dict(base_config(tmp_path / "p", data={"bag_level": "patient"}))
    summary = run_training(cfg, bags=bags)
    rows = list(csv.DictReader(open(tmp_path / "p/run/predictions.csv")))
    assert len(rows) == 16 and rows[0]["slide_id"].startswith("P")
