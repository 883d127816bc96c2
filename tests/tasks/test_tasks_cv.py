"""Tasks through cross-validation: survival, multi-class, patients, bad inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    roc_auc_score,
)
from sksurv.metrics import concordance_index_censored

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
    # each fold's c-index is scikit-survival's on its test rows of predictions.csv
    truth = {b.slide_id: (b.time, b.event) for b in survival_bags()}
    folds = []
    for fold in summary["folds"]:
        part = [r for r in rows if int(r["fold"]) == fold["fold"]]
        time = np.array([float(r["time"]) for r in part])
        event = np.array([int(r["event"]) for r in part], dtype=bool)
        assert time == pytest.approx([truth[r["slide_id"]][0] for r in part], abs=1e-6)
        assert event.tolist() == [bool(truth[r["slide_id"]][1]) for r in part]
        risk = np.array([float(r["risk"]) for r in part])
        want = concordance_index_censored(event, time, risk)[0]
        assert fold["metrics"]["c_index"] == pytest.approx(want, abs=1e-6)
        folds.append(fold["metrics"]["c_index"])
    assert c["mean"] == pytest.approx(np.mean(folds))
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
    # each fold's metrics are scikit-learn's on its test rows of predictions.csv
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions.csv")))
    assert sorted(r["slide_id"] for r in rows) == sorted(b.slide_id for b in bags)
    per_fold = {}
    for fold in summary["folds"]:
        part = [r for r in rows if int(r["fold"]) == fold["fold"]]
        y = np.array([int(r["label"]) for r in part])
        p = np.array([[float(r[f"p_{k}"]) for k in range(3)] for r in part])
        pred = np.array([int(r["prediction"]) for r in part])
        assert pred.tolist() == p.argmax(1).tolist()
        want = {
            "auc": roc_auc_score(y, p, multi_class="ovr"),
            "kappa": cohen_kappa_score(y, pred, weights="quadratic"),
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "auc_class2": roc_auc_score(y == 2, p[:, 2]),
            "recall_class1": float((pred[y == 1] == 1).mean()),
        }
        for key, value in want.items():
            assert fold["metrics"][key] == pytest.approx(value, abs=1e-4), key
            per_fold.setdefault(key, []).append(fold["metrics"][key])
    for key, values in per_fold.items():
        assert m[key]["mean"] == pytest.approx(np.mean(values)), key
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
    # a patient's probability is the mean of its slides' (predictions.csv), scored
    # with the fold's threshold
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions.csv")))
    aucs, accs = [], []
    for fold in summary["folds"]:
        probs, labels = {}, {}
        for r in rows:
            if int(r["fold"]) == fold["fold"]:
                probs.setdefault(r["patient_id"], []).append(float(r["probability"]))
                labels[r["patient_id"]] = int(r["label"])
        ids = sorted(probs)
        y = [labels[i] for i in ids]
        p = np.array([np.mean(probs[i]) for i in ids])
        name = f"r{fold['repeat']}_f{fold['fold']}"
        result = json.loads((tmp_path / "run/folds" / name / "result.json").read_text())
        got = result["patient_metrics"]
        assert got["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        acc = np.mean((p >= fold["threshold"]) == np.array(y))
        assert got["accuracy"] == pytest.approx(acc)
        aucs.append(got["auc"])
        accs.append(got["accuracy"])
    assert summary["patient_metrics"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert summary["patient_metrics"]["accuracy"]["mean"] == pytest.approx(
        np.mean(accs)
    )
    cfg = from_dict(base_config(tmp_path / "p", data={"bag_level": "patient"}))
    summary = run_training(cfg, bags=bags)
    rows = list(csv.DictReader(open(tmp_path / "p/run/predictions.csv")))
    assert len(rows) == 16 and rows[0]["slide_id"].startswith("P")
    patients = {b.patient_id: b.label for b in bags}
    assert {r["slide_id"]: int(r["label"]) for r in rows} == patients
