import csv

import numpy as np
import pytest
from click.testing import CliRunner

from tiahnm.cli import cli
from tiahnm.evaluation.predict import checkpoint_paths, predict_slides
from tiahnm.evaluation.scores import read_instance_scores


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def inputs(trained_run, tmp_path):
    """Three good feature files and a corrupt one."""
    good = sorted(trained_run.features.glob("*.h5"))[:3]
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"this is not an HDF5 file")
    return good, bad


def test_predict_isolates_a_corrupt_file(trained_run, inputs, tmp_path):
    good, bad = inputs
    out = tmp_path / "pred"
    res = CliRunner().invoke(
        cli,
        [
            "predict",
            str(trained_run.run),
            *map(str, good),
            str(bad),
            "--output-path",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 3, res.output
    assert "ensemble of 2 heads" in res.output
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0]) == ["slide_id", "probability", "prediction", "n_patches"]
    assert [r["slide_id"] for r in rows] == [p.stem for p in good]
    for r in rows:
        assert 0.0 <= float(r["probability"]) <= 1.0
        assert r["prediction"] in ("0", "1") and int(r["n_patches"]) >= 6
    failures = read_csv(out / "failures.csv")
    assert len(failures) == 1 and failures[0]["slide"] == str(bad)
    assert "unreadable HDF5" in failures[0]["error"]
    slides, attrs = read_instance_scores(out / "instance_scores.h5")
    assert [s.slide_id for s in slides] == [p.stem for p in good]
    assert slides[0].coords is not None and slides[0].label == -1
    assert len(slides[0].scores) == int(rows[0]["n_patches"])
    assert attrs["score_kind"] == "instance_prob"
    # heatmaps straight from the prediction output
    res = CliRunner().invoke(
        cli, ["heatmap", str(out), "--output-path", str(tmp_path / "hm")]
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "hm").glob("*_overlay.png"))) == 3


def test_run_folder_is_the_mean_of_its_folds(trained_run, inputs, tmp_path):
    good, _ = inputs
    folds = checkpoint_paths(trained_run.run)
    assert len(folds) == 2
    ens = predict_slides(trained_run.run, good, tmp_path / "ens", device="cpu")
    single = [
        predict_slides(f, good, tmp_path / f"f{i}", device="cpu")
        for i, f in enumerate(folds)
    ]
    for i, row in enumerate(ens.predictions):
        mean = np.mean([s.predictions[i].probability for s in single])
        assert row.probability == pytest.approx(mean, abs=1e-6)
    assert ens.threshold == pytest.approx(np.mean([s.threshold for s in single]))


def test_all_failed_and_wrong_width(trained_run, tmp_path):
    from tiahnm.slides.store import write_feature_file

    wide = tmp_path / "wide.h5"
    write_feature_file(
        wide,
        features=np.zeros((4, 5), np.float32),
        coords=np.zeros((4, 2)),
        attrs={},
    )
    res = CliRunner().invoke(
        cli,
        ["predict", str(trained_run.run), str(wide), "--output-path", str(tmp_path)],
    )
    assert res.exit_code == 1, res.output
    (fail,) = read_csv(tmp_path / "failures.csv")
    assert "features have width 5, the head expects 8" in fail["error"]


def test_bad_checkpoint(tmp_path):
    res = CliRunner().invoke(
        cli, ["predict", str(tmp_path), str(tmp_path), "--output-path", str(tmp_path)]
    )
    assert res.exit_code == 1 and "no folds/*/best.pt" in res.output


@pytest.mark.slow
def test_predict_extracts_slide_images(trained_run, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(
        tmp_path / "img.png"
    )
    out = tmp_path / "pred"
    res = CliRunner().invoke(
        cli,
        [
            "predict",
            str(checkpoint_paths(trained_run.run)[0]),
            str(tmp_path / "img.png"),
            "--output-path",
            str(out),
            "--mpp",
            "0.5",
            "--patch-size",
            "64",
            "--masker",
            "none",
            "--encoder-option",
            "out_dim=8",  # the synthetic head takes 8 features
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    (row,) = read_csv(out / "predictions.csv")
    assert row["slide_id"] == "img" and row["n_patches"] == "4"
    assert (out / "features" / "img.h5").is_file()
    (scores,), _ = read_instance_scores(out / "instance_scores.h5")
    assert scores.meta["slide_path"].endswith("img.png")


@pytest.mark.parametrize("cmd", ["predict", "heatmap", "report"])
def test_help(cmd):
    res = CliRunner().invoke(cli, [cmd, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output
