"""The csv_log and tensorboard callbacks, resuming, and failing callbacks."""

from __future__ import annotations

import csv
import json
import math

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.callbacks.helpers import (
    CallbackTestPlugin,
    Interrupt,
    fold_results,
    tiny_config,
)
from tiahnm.callbacks.base import CallbackError
from tiahnm.cli import cli
from tiahnm.crossval import run_training
from tiahnm.errors import ConfigError
from tiahnm.plugins import get_plugin_manager, get_registry

ROW_KEYS = ("train_loss", "val_loss", "val_auc")


def read_csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def scalars(log_dir, tag):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_builtins_are_registered_through_the_hook():
    registry = get_registry("callback")
    assert {"csv_log", "tensorboard", "mlflow"} <= set(registry)
    assert registry["csv_log"].plugin == "tiahnm.callbacks.plugin"


def test_csv_and_tensorboard_hold_every_epoch_fold_and_summary(tmp_path):
    config = tiny_config(tmp_path, [{"name": "csv_log"}, {"name": "tensorboard"}])
    summary = run_training(config)
    out = tmp_path / "out"
    results = fold_results(out)
    rows = read_csv(out / "metrics.csv")
    expected = [
        (f, i, h) for f, r in results.items() for i, h in enumerate(r["history"])
    ]
    assert len(rows) == len(expected) == 6
    for row, (fold, step, hist) in zip(rows, expected, strict=True):
        assert (row["fold"], int(row["step"])) == (fold, step)
        for key in ROW_KEYS:
            assert float(row[key]) == hist[key]
    for fold, result in results.items():
        loss = scalars(out / "tensorboard" / fold, "train_loss")
        assert loss == [
            (i, pytest.approx(h["train_loss"], rel=1e-6))
            for i, h in enumerate(result["history"])
        ]
        ((step, auc),) = scalars(out / "tensorboard" / fold, "test/auc")
        assert step == 2
        assert auc == pytest.approx(result["metrics"]["auc"], rel=1e-6)
        ((_, val_auc),) = scalars(out / "tensorboard" / fold, "val/auc")
        assert val_auc == pytest.approx(result["val_metrics"]["auc"], rel=1e-6)
    ((_, mean_auc),) = scalars(out / "tensorboard" / "summary", "test/auc_mean")
    assert mean_auc == pytest.approx(summary["metrics"]["auc"]["mean"], rel=1e-6)


def test_a_killed_run_resumes_its_callbacks_without_doubling_rows(tmp_path):
    """Killed mid-fold; the rerun cuts the CSV back to the saved state and skips
    the rows the callbacks already had, so both logs equal an uninterrupted run's."""
    get_plugin_manager().register(CallbackTestPlugin(), name="test-callbacks")
    callbacks = [{"name": "csv_log"}, {"name": "tensorboard"}]
    # checkpoint only at the last epoch: the resumed fold replays epochs 0 and 1
    ref = tiny_config(tmp_path / "ref", callbacks, checkpoint_every=3)
    run_training(ref)
    Interrupt.armed = True
    config = tiny_config(
        tmp_path / "run", [*callbacks, {"name": "interrupt"}], checkpoint_every=3
    )
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    out = tmp_path / "run" / "out"
    # the kill came after csv_log appended epoch 1 of r0_f1 and before the state save
    assert len(read_csv(out / "metrics.csv")) == 5
    state = json.loads((out / "callbacks.json").read_text())
    assert state["0:csv_log"]["state"]["rows"] == 4
    run_training(config)
    got, want = (
        read_csv(out / "metrics.csv"),
        read_csv(tmp_path / "ref" / "out" / "metrics.csv"),
    )
    assert got == want
    for fold in ("r0_f0", "r0_f1"):
        steps = scalars(out / "tensorboard" / fold, "train_loss")
        ref_steps = scalars(
            tmp_path / "ref" / "out" / "tensorboard" / fold, "train_loss"
        )
        assert steps == ref_steps
        assert [s for s, _ in steps] == [0, 1, 2]


def test_a_finished_run_rerun_leaves_the_logs_alone(tmp_path):
    config = tiny_config(tmp_path, [{"name": "csv_log"}])
    run_training(config)
    before = (tmp_path / "out" / "metrics.csv").read_text()
    run_training(config)  # every fold done: nothing new is delivered
    assert (tmp_path / "out" / "metrics.csv").read_text() == before


def test_a_callback_added_to_a_finished_run_gets_every_row(tmp_path):
    run_training(tiny_config(tmp_path, []))
    results = fold_results(tmp_path / "out")
    run_training(tiny_config(tmp_path, [{"name": "csv_log"}]))
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert [float(r["train_loss"]) for r in rows] == [
        h["train_loss"] for r in results.values() for h in r["history"]
    ]


def test_a_raising_callback_is_named(tmp_path):
    get_plugin_manager().register(CallbackTestPlugin(), name="test-callbacks")
    config = tiny_config(tmp_path, [{"name": "csv_log"}, {"name": "boom"}])
    with pytest.raises(CallbackError) as info:
        run_training(config)
    assert (
        str(info.value)
        == "callback 'boom' failed in on_epoch_end: ValueError: disk full"
    )


def test_cli_reports_a_raising_callback_with_exit_code_1(tmp_path):
    get_plugin_manager().register(CallbackTestPlugin(), name="test-callbacks")
    config = tiny_config(tmp_path, [{"name": "boom"}])
    from tiahnm.config import save_config

    save_config(config, tmp_path / "c.yaml")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1, result.output
    assert (
        "Error: callback 'boom' failed in on_epoch_end: ValueError: disk full"
        in result.output
    )


def test_unknown_callback_option_and_name_are_errors_naming_the_key(tmp_path):
    config = tiny_config(tmp_path, [{"name": "csv_log", "options": {"pth": "x.csv"}}])
    with pytest.raises(ConfigError, match=r"callbacks\[0\]\.options\.pth"):
        run_training(config)
    config = tiny_config(tmp_path, [{"name": "csvlog"}])
    with pytest.raises(Exception, match="Unknown callback 'csvlog'"):
        run_training(config)


def test_csv_log_cuts_a_torn_line(tmp_path):
    """A crash in the middle of an append leaves a short line; resuming drops it."""
    from tiahnm.callbacks.base import RunInfo
    from tiahnm.callbacks.csv_log import CSVLog

    log = CSVLog()
    run = RunInfo(tmp_path, fold="r0_f0")
    log.on_run_start(run)
    for step in range(2):
        run.step = step
        log.on_epoch_end(run, {"round": 0, "epoch": step, "train_loss": 0.5 + step})
    state = log.state_dict()
    with (tmp_path / "metrics.csv").open("a") as fh:
        fh.write("r0_f0,2,0,2,0.")  # torn line
    resumed = CSVLog()
    resumed.load_state_dict(state)
    resumed.on_run_start(run)
    rows = read_csv(tmp_path / "metrics.csv")
    assert [float(r["train_loss"]) for r in rows] == [0.5, 1.5]
    assert not math.isnan(float(rows[0]["epoch"]))
