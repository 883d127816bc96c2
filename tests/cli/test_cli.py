import csv as csv_module
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, roc_auc_score

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.parametrize("cmd", [[], ["run"], ["train"], ["plugins"], ["init"]])
def test_help(runner, cmd):
    res = runner.invoke(cli, [*cmd, "--help"])
    assert res.exit_code == 0
    assert "Usage:" in res.output


def test_version(runner):
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and "tiahnm" in res.output


def test_help_does_not_import_torch():
    code = "import sys; from tiahnm.cli import cli\ntry:\n    cli(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().endswith("False")


def test_plugins_table_and_json(runner):
    res = runner.invoke(cli, ["plugins"])
    assert res.exit_code == 0
    header = res.output.splitlines()[0].split()
    assert header == ["name", "kind", "package", "version", "description"]
    assert any(
        line.split()[:3] == ["abmil_gated", "head", "tiahnm"]
        for line in res.output.splitlines()
    )
    res = runner.invoke(cli, ["plugins", "--json"])
    data = json.loads(res.output)
    kinds = {r["kind"] for r in data["plugins"]}
    assert {"head", "miner", "loss", "encoder", "bag_source"} <= kinds
    res = runner.invoke(cli, ["plugins", "--kind", "heads"])
    assert res.exit_code == 2 and "Unknown plugin kind 'heads'" in res.output


def test_init_writes_valid_template(runner, tmp_path):
    target = tmp_path / "c.yaml"
    res = runner.invoke(cli, ["init", str(target)])
    assert res.exit_code == 0 and target.is_file()
    assert yaml.safe_load(target.read_text())["train"]["epochs"] == 100
    res = runner.invoke(cli, ["init", str(target)])
    assert res.exit_code != 0 and "exists" in res.output
    assert runner.invoke(cli, ["init", str(target), "--force"]).exit_code == 0


def test_train_end_to_end_and_resume(runner, tmp_path):
    csv = tmp_path / "bags.csv"
    write_mil_csv(csv, make_bags(20))
    out = tmp_path / "out"
    args = [
        "train",
        "--mil-csv",
        str(csv),
        "--head",
        "abmil",
        "--folds",
        "2",
        "--epochs",
        "3",
        "--output-path",
        str(out),
        "--set",
        "head.options.embed_dim=16",
        "--set",
        "train.lr=0.005",
    ]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_folds"] == 2
    assert 0.0 <= summary["metrics"]["auc"]["mean"] <= 1.0
    assert {"mean", "std"} <= set(summary["metrics"]["accuracy"])
    assert len(summary["folds"]) == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["head"]["options"]["embed_dim"] == 16 and saved["train"]["epochs"] == 3
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "slide_id,repeat,fold,label,probability,prediction"
    assert len(lines) == 21
    # the summary is scikit-learn's AUC and accuracy of each fold's test rows, averaged
    rows = list(csv_module.DictReader(lines))
    truth = {b.slide_id: b.label for b in make_bags(20)}
    assert {r["slide_id"]: int(r["label"]) for r in rows} == truth
    aucs, accs = [], []
    for fold in summary["folds"]:
        part = [r for r in rows if int(r["fold"]) == fold["fold"]]
        y = [int(r["label"]) for r in part]
        p = np.array([float(r["probability"]) for r in part])
        pred = [int(r["prediction"]) for r in part]
        assert pred == (p >= fold["threshold"]).astype(int).tolist()
        assert fold["metrics"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        assert fold["metrics"]["accuracy"] == pytest.approx(accuracy_score(y, pred))
        aucs.append(fold["metrics"]["auc"])
        accs.append(fold["metrics"]["accuracy"])
    assert summary["metrics"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert summary["metrics"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert (out / "folds" / "r0_f0" / "best.pt").is_file()
    assert not (out / "folds" / "r0_f0" / "last.pt").exists()
    # A second run finds every fold done and reproduces the same summary.
    mtime = (out / "folds" / "r0_f0" / "result.json").stat().st_mtime_ns
    res = runner.invoke(cli, args)
    assert res.exit_code == 0
    assert (out / "folds" / "r0_f0" / "result.json").stat().st_mtime_ns == mtime
    assert (
        json.loads((out / "summary.json").read_text())["metrics"] == summary["metrics"]
    )


@pytest.mark.parametrize(
    ("extra", "code", "fragment"),
    [
        (
            ["--head", "abmill"],
            2,
            "Unknown head 'abmill'. Registered heads: abmil, abmil_gated",
        ),
        (["--miner", "nope"], 2, "Unknown miner 'nope'"),
        (["--set", "head.options.hidden=3"], 2, "Unknown option head.options.hidden"),
        (["--set", "train.epoch=3"], 2, "Unknown config key 'train.epoch'"),
        (
            ["--miner", "mhim", "--set", "miner.options.mask_ratio_h=1.5"],
            2,
            "Error: miner.options.mask_ratio_h: expected a number in [0, 1], got 1.5.",
        ),
        (
            ["--head", "clam_sb", "--set", "head.options.inst_loss=hinge"],
            2,
            "Error: head.options.inst_loss: expected one of svm, ce, got 'hinge'.",
        ),
    ],
)
def test_train_errors(runner, tmp_path, extra, code, fragment):
    csv = tmp_path / "bags.csv"
    write_mil_csv(csv, make_bags(8))
    res = runner.invoke(
        cli,
        [
            "train",
            "--mil-csv",
            str(csv),
            "--folds",
            "2",
            "--epochs",
            "1",
            "--output-path",
            str(tmp_path / "o"),
            *extra,
        ],
    )
    assert res.exit_code == code, res.output
    assert fragment in res.output


def test_train_missing_data_file(runner, tmp_path):
    res = runner.invoke(
        cli,
        [
            "train",
            "--mil-csv",
            str(tmp_path / "none.csv"),
            "--output-path",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 1
    assert "none.csv: MIL CSV file not found" in res.output


def test_run_takes_a_config_or_the_demo_not_both(runner, tmp_path):
    # `tiahnm run` without CONFIG runs the demo (tests/test_demo.py)
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    res = runner.invoke(cli, ["run", str(config), "--demo"])
    assert res.exit_code == 2 and "give either CONFIG or --demo, not both" in res.output
    res = runner.invoke(cli, ["run", str(config), "--quick"])
    assert res.exit_code == 2 and "--quick applies to the demo only" in res.output


def test_console_script_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tiahnm", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "plugins" in out.stdout
