"""External cohorts, task-aware predict / scores / report, errors before training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tiahnm.config import from_dict
from tiahnm.crossval import run_training
from tiahnm.data.bag import Bag
from tiahnm.data.cohort import patient_bags
from tiahnm.errors import ConfigError, DataError
from tiahnm.evaluation.scores import read_instance_scores, scores_from_bags
from tiahnm.tasks.survival import harrell_c_index

GRID, PATCH = 4, 32


def write_cohort(root: Path, kind: str, n: int, seed: int) -> tuple[Path, Path]:
    """h5 features + labels CSV; 2 slides per patient; signal in feature 0."""
    from tiahnm.slides.store import write_feature_file

    rng = np.random.default_rng(seed)
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n // 2):
        k = int(rng.integers(0, 3))
        t_event = rng.exponential(1.0 / np.exp(1.0 * k))
        t_cens = rng.exponential(2.5)
        for j in range(2):
            sid = f"s{seed}_{p:02d}_{j}"
            m = int(rng.integers(5, 9))
            x = rng.normal(size=(m, 4)).astype(np.float32)
            x[: k + 1 if kind == "multiclass" else k, 0] += 3.0
            i = np.arange(m)
            write_feature_file(
                feats / f"{sid}.h5",
                features=x,
                coords=np.stack([(i % GRID) * PATCH, (i // GRID) * PATCH], axis=1),
                attrs={"level0_dimensions": [GRID * PATCH, 3 * PATCH]},
                coords_attrs={"patch_size_level0": [PATCH, PATCH]},
            )
            if kind == "survival":
                ev = int(t_event <= t_cens)
                rows.append([sid, f"{min(t_event, t_cens):.5f}", ev, f"P{seed}_{p}"])
            elif kind == "regression":
                rows.append([sid, f"{2.0 * k + 0.1 * p:.4f}", f"P{seed}_{p}"])
            else:
                label = int(k > 0) if kind == "binary" else k
                rows.append([sid, label, f"P{seed}_{p}"])
    labels = root / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        head = {
            "survival": ["slide_id", "time", "event"],
            "regression": ["slide_id", "target"],
        }.get(kind, ["slide_id", "label"])
        w.writerow([*head, "patient_id"])
        w.writerows(rows)
    return feats, labels


def config(root: Path, feats: Path, labels: Path, task: dict, **extra) -> dict:
    cfg = {
        "output_dir": str(root / "run"),
        "data": {
            "source": "h5_folder",
            "options": {"features_dir": str(feats), "labels_csv": str(labels)},
        },
        "task": task,
        "head": {"name": "abmil", "options": {"embed_dim": 8}},
        "train": {"epochs": 3, "progress": False, "batch_size": 4, "lr": 1e-2},
        "cv": {"folds": 2, "val_fraction": 0.25},
        "evaluation": {"bootstrap": 30},
    }
    for k, v in extra.items():
        cfg[k] = v if not isinstance(v, dict) else {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture(scope="module")
def survival_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("surv")
    feats, labels = write_cohort(root / "train", "survival", 32, 0)
    task = {"name": "survival", "options": {"loss": "cox"}}
    run_training(from_dict(config(root, feats, labels, task)))
    ext_feats, ext_labels = write_cohort(root / "ext", "survival", 24, 1)
    return {"root": root, "run": root / "run", "feats": ext_feats, "labels": ext_labels}


@pytest.fixture(scope="module")
def multiclass_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mc")
    feats, labels = write_cohort(root / "train", "multiclass", 36, 2)
    task = {"name": "multiclass", "options": {"ordinal": True}}
    run_training(from_dict(config(root, feats, labels, task)))
    ext_feats, ext_labels = write_cohort(root / "ext", "multiclass", 24, 3)
    return {"root": root, "run": root / "run", "feats": ext_feats, "labels": ext_labels}


def _evaluate(run: dict, out: Path) -> tuple[int, str]:
    from tiahnm.cli import cli

    res = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(run["run"]),
            "--labels",
            str(run["labels"]),
            "--features-dir",
            str(run["feats"]),
            "--output-path",
            str(out),
            "--bootstrap",
            "50",
        ],
    )
    return res.exit_code, res.output


def test_survival_run_report_has_km_curve_and_risk_scores(survival_run) -> None:
    run = survival_run["run"]
    report = (run / "report.md").read_text()
    assert "km.png" in report and (run / "km.png").stat().st_size > 1000
    assert "c-index (Harrell)" in report and "Log-rank p" in report
    # instance_scores.h5 stores the risk (not a class probability) per slide
    slides, attrs = read_instance_scores(run / "folds/r0_f0/instance_scores.h5")
    res = json.loads((run / "folds/r0_f0/result.json").read_text())
    risk = {p["slide_id"]: p["risk"] for p in res["predictions"]}
    assert attrs["slide_score"] == "risk"
    for s in slides:
        assert s.probability == pytest.approx(risk[s.slide_id], abs=1e-9)


def test_evaluate_survival_cohort_matches_scikit_survival(survival_run, tmp_path):
    code, output = _evaluate(survival_run, tmp_path / "ext")
    assert code == 0, output
    summary = json.loads((tmp_path / "ext/summary.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "ext/predictions.csv")))
    assert len(rows) == 24 and {"risk", "high_risk", "patient_id"} <= set(rows[0])
    t = np.array([float(r["time"]) for r in rows])
    e = np.array([int(r["event"]) for r in rows])
    risk = np.array([float(r["risk"]) for r in rows])
    c = summary["metrics"]["c_index"]
    assert c["value"] == pytest.approx(harrell_c_index(t, e, risk), abs=1e-5)
    assert c["ci95"][0] <= c["value"] <= c["ci95"][1]
    assert summary["n_patients"] == 12 and "c_index" in summary["patient_metrics"]
    assert len(summary["checkpoints"]) == 2  # the fold ensemble
    report = (tmp_path / "ext/report.md").read_text()
    assert "Patient-level metrics" in report and "km.png" in report
    assert "slide    c_index" in output


def test_predict_writes_risks_for_survival(survival_run, tmp_path) -> None:
    from tiahnm.cli import cli

    h5s = sorted(survival_run["feats"].glob("*.h5"))[:3]
    res = CliRunner().invoke(
        cli,
        [
            "predict",
            str(survival_run["run"]),
            *map(str, h5s),
            "--output-path",
            str(tmp_path / "pred"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "pred/predictions.csv")))
    assert list(rows[0]) == ["slide_id", "risk", "high_risk", "n_patches"]
    ext = {}
    _evaluate(survival_run, tmp_path / "ext")
    for r in csv.DictReader(open(tmp_path / "ext/predictions.csv")):
        ext[r["slide_id"]] = float(r["risk"])
    for r in rows:  # predict and evaluate give the same ensemble risk
        assert float(r["risk"]) == pytest.approx(ext[r["slide_id"]], abs=1e-5)


def test_multiclass_confusion_report_predict_and_class_scores(
    multiclass_run, tmp_path
) -> None:
    from sklearn.metrics import confusion_matrix

    from tiahnm.cli import cli

    run = multiclass_run["run"]
    res = json.loads((run / "folds/r0_f0/result.json").read_text())
    y = [p["label"] for p in res["predictions"]]
    pred = [p["prediction"] for p in res["predictions"]]
    ref = confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    assert res["confusion_matrix"] == ref
    report = (run / "report.md").read_text()
    assert "Confusion matrix (test folds summed" in report
    assert "Cohen's kappa with quadratic weights" in report
    slides, _ = read_instance_scores(run / "folds/r0_f0/instance_scores.h5")
    cs = slides[0].class_scores
    assert cs.shape == (slides[0].scores.shape[0], 3)
    np.testing.assert_allclose(cs.sum(1), 1.0, atol=1e-5)
    code, output = _evaluate(multiclass_run, tmp_path / "ext")
    assert code == 0, output
    summary = json.loads((tmp_path / "ext/summary.json").read_text())
    assert {"auc", "kappa", "balanced_accuracy"} <= set(summary["metrics"])
    assert np.asarray(summary["confusion_matrix"]).sum() == 24
    h5s = sorted(multiclass_run["feats"].glob("*.h5"))[:2]
    res = CliRunner().invoke(
        cli, ["predict", str(run), *map(str, h5s), "--output-path", str(tmp_path / "p")]
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "p/predictions.csv")))
    assert {"p_0", "p_1", "p_2"} <= set(rows[0])
    p = np.array([[float(r[f"p_{k}"]) for k in range(3)] for r in rows])
    assert [int(r["prediction"]) for r in rows] == p.argmax(1).tolist()
    with h5py.File(tmp_path / "p/instance_scores.h5") as f:
        assert f[next(iter(f))]["class_scores"].shape[1] == 3
    res = CliRunner().invoke(
        cli,
        [
            "heatmap",
            str(tmp_path / "p"),
            "--output-path",
            str(tmp_path / "hm"),
            "--class",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "hm").glob("*.png"))) >= 2


def test_evaluate_binary_cohort_auc_matches_sklearn(tmp_path) -> None:
    from sklearn.metrics import roc_auc_score

    feats, labels = write_cohort(tmp_path / "train", "binary", 24, 4)
    run_training(from_dict(config(tmp_path, feats, labels, {"name": "binary"})))
    ext_feats, ext_labels = write_cohort(tmp_path / "ext", "binary", 20, 5)
    run = {"run": tmp_path / "run", "feats": ext_feats, "labels": ext_labels}
    code, output = _evaluate(run, tmp_path / "out")
    assert code == 0, output
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "out/predictions.csv")))
    y = [int(r["label"]) for r in rows]
    p = [float(r["probability"]) for r in rows]
    assert summary["metrics"]["auc"]["value"] == pytest.approx(
        roc_auc_score(y, p), abs=1e-5
    )
    acc = np.mean(
        [(pi >= summary["threshold"]) == yi for pi, yi in zip(p, y, strict=True)]
    )
    assert summary["metrics"]["accuracy"]["value"] == pytest.approx(acc, abs=1e-6)
    assert len(summary["metrics"]["auc"]["ci95"]) == 2
    assert "auc" in summary["patient_metrics"]


def test_evaluate_bad_cohort_names_the_row(survival_run, tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    text = survival_run["labels"].read_text().splitlines()
    cells = text[2].split(",")
    cells[2] = "2"
    text[2] = ",".join(cells)
    bad.write_text("\n".join(text) + "\n")
    run = dict(survival_run, labels=bad)
    code, output = _evaluate(run, tmp_path / "x")
    assert code == 1 and "row 3" in output and "'event'" in output


def test_patient_bag_scores_are_split_per_slide() -> None:
    bags = []
    for j, n in enumerate((3, 5)):
        bags.append(
            Bag(
                f"s{j}",
                1,
                torch.zeros(n, 2),
                coords=np.arange(2 * n).reshape(n, 2) + 100 * j,
                patient_id="P1",
            )
        )
    (patient,) = patient_bags(bags)
    scores = [np.arange(8, dtype=np.float32)]
    out = scores_from_bags([patient], scores, np.array([[0.3, 0.7]]), 0.5)
    assert [s.slide_id for s in out] == ["s0", "s1"]
    np.testing.assert_array_equal(out[1].scores, [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(out[1].coords, bags[1].coords)
    assert out[0].meta["patient_id"] == "P1" and out[1].probability == 0.7


def _bags(labels, names=None) -> list[Bag]:
    out = []
    for i, y in enumerate(labels):
        b = Bag(f"s{i}", y, torch.randn(4, 3))
        if names:
            b.meta["class_name"] = names[y]
        out.append(b)
    return out


def test_errors_before_training(tmp_path) -> None:
    from tiahnm.data.h5_features import read_labels_csv

    csv_path = tmp_path / "l.csv"
    csv_path.write_text("slide_id,label\na,LUAD\nb,LUSC\n")
    with pytest.raises(DataError, match=r"l.csv: class 'MESO' listed"):
        read_labels_csv(csv_path, classes=["LUAD", "LUSC", "MESO"])
    base = {
        "output_dir": str(tmp_path / "r"),
        "train": {"epochs": 1, "progress": False},
        "cv": {"folds": 2},
    }
    mc = base | {"task": {"name": "multiclass", "options": {"ordinal": True}}}
    with pytest.raises(DataError, match="class 1 has no bag"):
        run_training(from_dict(mc), bags=_bags([0, 2] * 6))
    names = ["G1", "G2", "G3"]
    with pytest.raises(ConfigError, match="ordinal: true needs integer classes"):
        run_training(from_dict(mc), bags=_bags([0, 1, 2] * 4, names))
    bags = _bags([0] * 10)
    for i, b in enumerate(bags):  # one event only, tested in fold 1 of the file
        b.time, b.event = float(i + 1), int(i == 0)
    split = tmp_path / "splits.csv"
    lines = ["slide_id,repeat,fold,split"]
    for f in range(2):
        for i in range(10):
            part = (
                "test" if (i < 5) == (f == 1) else ("val" if i in (5, 9) else "train")
            )
            lines.append(f"s{i},0,{f},{part}")
    split.write_text("\n".join(lines) + "\n")
    surv = base | {
        "task": {"name": "survival", "options": {"loss": "cox"}},
        "cv": {"split_file": str(split)},
    }
    with pytest.raises(DataError, match=r"fold r0_f1 has no event among its"):
        run_training(from_dict(surv), bags=bags)
    assert not (tmp_path / "r" / "folds").exists()  # nothing trained


def test_uno_c_index_and_td_auc_use_the_training_censoring() -> None:
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc

    from tiahnm.tasks.survival import SurvivalTask

    rng = np.random.default_rng(0)

    def bags(n: int) -> list[Bag]:
        out = []
        for i in range(n):
            t = float(rng.exponential(1.0))
            out.append(
                Bag(f"b{i}", 0, torch.zeros(1, 1), time=t, event=int(i % 3 != 0))
            )
        return out

    train, test = bags(60), bags(40)
    task = SurvivalTask(loss="cox")
    task.fit(train)
    risk = -np.array([b.time for b in test]) + rng.normal(0, 0.5, 40)
    m = task.metrics(test, risk[:, None], 0.0)

    def y(bs: list[Bag]) -> np.ndarray:
        return np.array(
            [(bool(b.event), b.time) for b in bs], dtype=[("e", bool), ("t", float)]
        )

    t_train = np.array([b.time for b in train])
    tau = np.percentile(t_train, 80)
    ref = concordance_index_ipcw(y(train), y(test), risk, tau=tau)[0]
    assert m["uno_c_index"] == pytest.approx(ref, abs=1e-12)
    ev = t_train[[bool(b.event) for b in train]]
    times = np.quantile(ev, [0.25, 0.5, 0.75])
    ref_auc = cumulative_dynamic_auc(y(train), y(test), risk, times)[1]
    assert m["td_auc"] == pytest.approx(ref_auc, abs=1e-12)
    assert 0.6 < m["uno_c_index"] <= 1.0  # risk ranks early events high


def test_report_command_keeps_the_survival_sections(survival_run) -> None:
    from tiahnm.cli import cli

    run = survival_run["run"]
    (run / "km.png").unlink()
    res = CliRunner().invoke(cli, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "km.png" in (run / "report.md").read_text() and (run / "km.png").is_file()
    page = (run / "report.html").read_text()
    assert "report_files/km.png" in page and (run / "report_files" / "km.png").is_file()
    assert "roc.png" not in page  # no class probability to draw a ROC from


def test_patient_level_run_stores_scores_per_slide(tmp_path) -> None:
    feats, labels = write_cohort(tmp_path / "c", "binary", 16, 6)
    cfg = config(
        tmp_path, feats, labels, {"name": "binary"}, data={"bag_level": "patient"}
    )
    run_training(from_dict(cfg))
    slides, _ = read_instance_scores(tmp_path / "run/folds/r0_f0/instance_scores.h5")
    files = {p.stem: p for p in feats.glob("*.h5")}
    assert slides and all(s.slide_id in files for s in slides)
    for s in slides:
        with h5py.File(files[s.slide_id]) as f:
            np.testing.assert_array_equal(s.coords, f["coords"][()])
        assert s.meta["patient_id"].startswith("P") and s.meta["source"].endswith(".h5")


def test_regression_task_cv_metrics_and_evaluate(tmp_path) -> None:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    feats, labels = write_cohort(tmp_path / "train", "regression", 32, 7)
    task = {"name": "regression", "options": {"loss": "mse"}}
    cfg = config(tmp_path, feats, labels, task, train={"epochs": 6})
    summary = run_training(from_dict(cfg))
    rows = list(csv.DictReader(open(tmp_path / "run/predictions.csv")))
    assert {"target", "prediction"} <= set(rows[0]) and len(rows) == 32
    res = json.loads((tmp_path / "run/folds/r0_f0/result.json").read_text())
    y = [p["target"] for p in res["predictions"]]
    pred = [p["prediction"] for p in res["predictions"]]
    m = res["metrics"]
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred), abs=1e-9)
    assert m["r2"] == pytest.approx(r2_score(y, pred), abs=1e-9)
    assert m["pearson_r"] == pytest.approx(pearsonr(y, pred)[0], abs=1e-9)
    assert m["spearman_rho"] == pytest.approx(spearmanr(y, pred)[0], abs=1e-9)
    assert summary["metrics"]["mae"]["ci95"][0] <= summary["metrics"]["mae"]["pooled"]
    assert "| r2 |" in (tmp_path / "run/report.md").read_text()
    ext_feats, ext_labels = write_cohort(tmp_path / "ext", "regression", 12, 8)
    run = {"run": tmp_path / "run", "feats": ext_feats, "labels": ext_labels}
    code, output = _evaluate(run, tmp_path / "out")
    assert code == 0, output
    out = json.loads((tmp_path / "out/summary.json").read_text())
    ext = list(csv.DictReader(open(tmp_path / "out/predictions.csv")))
    yt = [float(r["target"]) for r in ext]
    pt = [float(r["prediction"]) for r in ext]
    assert out["metrics"]["mae"]["value"] == pytest.approx(
        mean_absolute_error(yt, pt), abs=1e-5
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,target\na,1.5\nb,nan\n")
    from tiahnm.data.cohort import read_cohort_columns

    with pytest.raises(DataError, match=r"bad.csv, row 3: 'target' = 'nan'"):
        read_cohort_columns(bad)
    cfg_mhim = config(tmp_path / "m", feats, labels, task, miner={"name": "mhim"})
    with pytest.raises(
        ConfigError, match="miner 'mhim' does not support task 'regression'"
    ):
        run_training(from_dict(cfg_mhim))
