import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from tiahnm.cli import cli
from tiahnm.evaluation import report as report_module
from tiahnm.evaluation.report import load_run, write_report_safely


def test_run_writes_report_with_table_and_plots(trained_run):
    run = trained_run.run
    text = (run / "report.md").read_text()
    assert "| metric | mean ± std over folds | pooled | 95% CI (pooled) |" in text
    for name in ("AUC", "accuracy", "F1", "false-positive rate", "instance AUC"):
        assert f"| {name} |" in text, name
    assert "![ROC curve of the pooled test predictions](roc.png)" in text
    assert "(confusion.png)" in text
    for png in ("roc.png", "confusion.png"):
        with Image.open(run / png) as img:
            assert img.format == "PNG" and img.size[0] > 200
    summary = json.loads((run / "summary.json").read_text())
    lo, hi = summary["metrics"]["auc"]["ci95"]
    assert lo <= summary["metrics"]["auc"]["pooled"] <= hi
    assert summary["ci"]["n_resamples"] == 200
    assert {"instance_auc", "instance_ap", "instance_f1"} <= set(summary["metrics"])
    for fold in ("r0_f0", "r0_f1"):
        assert (run / "folds" / fold / "instance_scores.h5").is_file()
        result = json.loads((run / "folds" / fold / "result.json").read_text())
        assert 0.0 <= result["instance_threshold"] <= 1.0


def test_report_command_links_heatmaps(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run)
    (run / "heatmaps").mkdir()
    Image.new("RGB", (8, 8)).save(run / "heatmaps" / "bag001.png")
    Image.new("RGBA", (8, 8)).save(run / "heatmaps" / "bag001_overlay.png")
    res = CliRunner().invoke(cli, ["report", str(run)])
    assert res.exit_code == 0, res.output
    text = (run / "report.md").read_text()
    assert "![bag001](heatmaps/bag001.png)" in text
    assert "overlay" not in text


def test_plot_failure_only_warns(trained_run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(report_module, "plot_roc", broken)
    summary, results = load_run(trained_run.run)
    with pytest.warns(RuntimeWarning, match="could not write the run report"):
        assert write_report_safely(tmp_path, summary, results) is None


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 1 and "no summary.json" in res.output
