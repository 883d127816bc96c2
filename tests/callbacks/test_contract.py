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


def test_example_plugin_callback_resumes_without_doubling(tmp_path, monkeypatch):
    """plugins/tiahnm-topk-miner's jsonl_log, from its source folder, through the
    contract run: killed after a line it wrote but before the state was saved."""
    import sys
    from pathlib import Path

    from tiahnm.plugins import PluginManager

    monkeypatch.syspath_prepend(
        str(Path(__file__).parents[2] / "plugins" / "tiahnm-topk-miner")
    )
    for module in [m for m in sys.modules if m.startswith("tiahnm_topk_miner")]:
        monkeypatch.delitem(sys.modules, module)
    import tiahnm_topk_miner.plugin

    pm = PluginManager(autoload=False)
    pm.register(tiahnm_topk_miner.plugin, name="topk_miner")
    factory = pm.get("callback")["jsonl_log"].factory
    runner = CallbackRunner([("jsonl_log", factory())], tmp_path)
    drive(runner, FOLDS, stop_after=("r0_f1", 1))
    path = tmp_path / "epochs.jsonl"
    # as if killed between the line and the state save: one line more than the state
    with path.open("a") as fh:
        fh.write(json.dumps({"fold": "r0_f1", "step": 2, "epoch": 2}) + "\n")
    drive(CallbackRunner([("jsonl_log", factory())], tmp_path), FOLDS)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["fold"], r["step"], r["epoch"]) for r in lines] == [
        (f, i, i) for f in FOLDS for i in range(3)
    ]
