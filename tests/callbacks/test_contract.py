"""Every registered callback, through a synthetic run's events, killed and resumed."""

from __future__ import annotations

import json

import pytest

from tiahnm.callbacks.base import Callback, CallbackRunner
from tiahnm.plugins import get_registry

FOLDS = ("r0_f0", "r0_f1")


def history(n=3):
    return [
        {"round": 0, "epoch": e, "train_loss": 1.0 / (e + 1), "val_auc": 0.5 + e / 10}
        for e in range(n)
    ]


def result(fold):
    return {
        "history": history(),
        "best_epoch": 2,
        "metrics": {"auc": 0.8, "accuracy": 0.7},
        "val_metrics": {"auc": 0.9, "loss": 0.3},
    }


def drive(runner, folds, *, stop_after=None):
    """Feed the events of a run; ``stop_after=(fold, epoch)`` is a kill there."""
    runner.run_start()
    for fold in folds:
        runner.fold_start(fold)
        runner.fit_start()
        for row in history():
            runner.epoch_end(row)
            if stop_after == (fold, row["epoch"]):
                return
        runner.fit_end(history())
        runner.fold_end(result(fold))
    runner.run_end(
        {"n_folds": len(folds), "metrics": {"auc": {"mean": 0.8, "std": 0.0}}}
    )


class Recorder(Callback):
    def __init__(self, inner):
        self.inner, self.events = inner, []

    def __getattribute__(self, name):
        if name.startswith("on_"):

            def call(run, *args):
                step = (run.fold, run.step) if name == "on_epoch_end" else run.fold
                object.__getattribute__(self, "events").append((name, step))
                return getattr(object.__getattribute__(self, "inner"), name)(run, *args)

            return call
        if name in ("state_dict", "load_state_dict"):
            return getattr(object.__getattribute__(self, "inner"), name)
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("name", sorted(get_registry("callback")))
def test_callback_contract(name, tmp_path):
    entry = get_registry("callback")[name]
    cb = entry.factory()
    assert isinstance(cb, Callback)
    assert entry.description
    # a kill in the middle of fold 2, then a resumed run: every epoch exactly once
    first = Recorder(cb)
    drive(
        CallbackRunner([(name, first)], tmp_path, {"head": {"name": "abmil"}}),
        FOLDS,
        stop_after=("r0_f1", 1),
    )
    saved = json.loads((tmp_path / "callbacks.json").read_text())
    assert json.loads(json.dumps(saved["0:" + name]["state"])) == cb.state_dict()
    second = Recorder(entry.factory())
    drive(
        CallbackRunner([(name, second)], tmp_path, {"head": {"name": "abmil"}}), FOLDS
    )
    epochs = [s for e, s in first.events + second.events if e == "on_epoch_end"]
    assert sorted(epochs) == [(f, i) for f in FOLDS for i in range(3)]
    assert len(epochs) == len(set(epochs))
    ends = [s for e, s in second.events if e == "on_fold_end"]
    assert ends == ["r0_f1"]  # r0_f0 was done before the kill
    assert [e for e, _ in second.events][-1] == "on_run_end"
