"""``tiahnm sweep``: grid expansion, bad specs, validation-only ranking, resume, jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from click.testing import CliRunner

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.cli import cli
from tiahnm.config import from_dict
from tiahnm.errors import ConfigError
from tiahnm.pipeline import PipelineResult
from tiahnm.sweep import expand_grid, parse_spec, run_sweep


def base_dict(tmp_path: Path, sweep: dict[str, Any]) -> dict[str, Any]:
    csv_path = tmp_path / "bags.csv"
    if not csv_path.is_file():
        write_mil_csv(csv_path, make_bags(24))
    return {
        "output_dir": str(tmp_path / "out"),
        "data": {"source": "mil_csv", "options": {"path": str(csv_path)}},
        "head": {"name": "abmil", "options": {"embed_dim": 16, "attn_dim": 8}},
        "train": {"epochs": 2, "lr": 0.005, "progress": False, "num_threads": 1},
        "cv": {"folds": 2, "val_fraction": 0.25},
        "evaluation": {"bootstrap": 0, "report": False},
        "sweep": sweep,
    }


def trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(
        study_name="tiahnm-sweep", storage=f"sqlite:///{out / 'sweep.db'}"
    )
    return study.get_trials()


class FakePipeline:
    """Stands in for run_pipeline: summary.json from a table of (val, test) AUCs."""

    def __init__(self, table: dict[float, tuple[float, float]], fail_on=None):
        self.table, self.fail_on, self.calls = table, fail_on, []

    def __call__(self, config, echo=None):
        lr = config.train.lr
        self.calls.append(lr)
        if lr == self.fail_on:
            self.fail_on = None
            raise KeyboardInterrupt  # killed in the middle of this trial
        val, test = self.table[lr]
        summary = {
            "n_folds": 2,
            "val_metrics": {
                "auc": {"mean": val, "std": 0.0, "n": 2},
                "loss": {"mean": 1 - val, "std": 0.0, "n": 2},
            },
            "metrics": {"auc": {"mean": test, "std": 0.01, "n": 2}},
        }
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary))
        return PipelineResult(summary=summary)


@pytest.fixture
def fake(monkeypatch):
    def install(table, fail_on=None):
        pipeline = FakePipeline(table, fail_on)
        monkeypatch.setattr("tiahnm.pipeline.run_pipeline", pipeline)
        return pipeline

    return install


def test_grid_expands_every_combination_first_key_slowest(tmp_path):
    config = from_dict(
        base_dict(
            tmp_path,
            {
                "params": {
                    "train.lr": [0.1, 0.2, 0.3],
                    "head.options.gated": [False, True],
                }
            },
        )
    )
    grid = expand_grid(parse_spec(config))
    assert grid == [
        {"train.lr": lr, "head.options.gated": g}
        for lr in (0.1, 0.2, 0.3)
        for g in (False, True)
    ]


def test_ranking_uses_validation_only_and_reports_test_of_the_chosen_trial(
    tmp_path, fake
):
    # lr 0.01 has the best test AUC but the worst validation AUC: it must not win
    table = {0.001: (0.70, 0.61), 0.003: (0.90, 0.62), 0.01: (0.60, 0.99)}
    fake(table)
    config = from_dict(base_dict(tmp_path, {"params": {"train.lr": list(table)}}))
    summary = run_sweep(config)
    assert [t["params"]["train.lr"] for t in summary["trials"]] == [0.003, 0.001, 0.01]
    assert [t["val_auc"] for t in summary["trials"]] == [0.90, 0.70, 0.60]
    best = summary["best"]
    assert best["params"] == {"train.lr": 0.003}
    assert best["test_metrics"]["auc"]["mean"] == 0.62
    text = (tmp_path / "out" / "sweep_summary.json").read_text()
    assert "0.99" not in text and "0.61" not in text  # no other trial's test metric
    assert "0.62" in (tmp_path / "out" / "sweep.md").read_text()
    # every trial is a run in its own folder under trials/
    assert {t["dir"] for t in summary["trials"]} == {
        f"trials/{p.name}" for p in (tmp_path / "out" / "trials").iterdir()
    }


def test_minimize_val_loss_picks_the_lowest(tmp_path, fake):
    table = {0.001: (0.70, 0.5), 0.003: (0.90, 0.5)}
    fake(table)
    sweep = {
        "params": {"train.lr": list(table)},
        "metric": "val_loss",
        "direction": "minimize",
    }
    summary = run_sweep(from_dict(base_dict(tmp_path, sweep)))
    assert summary["best"]["params"] == {"train.lr": 0.003}  # loss 0.1 < 0.3


def test_resume_runs_only_the_interrupted_trial(tmp_path, fake):
    table = {0.001: (0.7, 0.5), 0.003: (0.8, 0.5), 0.01: (0.6, 0.5)}
    config = from_dict(base_dict(tmp_path, {"params": {"train.lr": list(table)}}))
    first = fake(table, fail_on=0.003)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config)
    assert first.calls == [0.001, 0.003]
    second = fake(table)
    summary = run_sweep(config)
    assert sorted(second.calls) == [0.003, 0.01]  # 0.001 finished: not rerun
    assert summary["best"]["params"] == {"train.lr": 0.003}
    states = [t.state.name for t in trials(tmp_path / "out")]
    assert states.count("COMPLETE") == 3
    third = fake(table)
    run_sweep(config)
    assert third.calls == []


def test_optuna_search_runs_n_trials_within_the_ranges_and_resumes(tmp_path, fake):
    table = {lr: (lr * 10, 0.5) for lr in (0.001, 0.003, 0.01)}
    fake(table)
    sweep = {
        "method": "optuna",
        "n_trials": 4,
        "params": {
            "train.lr": list(table),
            "train.weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
            "head.options.attn_dim": {"low": 4, "high": 12, "step": 4},
        },
    }
    config = from_dict(base_dict(tmp_path, sweep))
    summary = run_sweep(config)
    done = [t for t in trials(tmp_path / "out") if t.state.name == "COMPLETE"]
    assert len(done) == len(summary["trials"]) == 4
    for t in done:
        assert 1e-6 <= t.params["train.weight_decay"] <= 1e-3
        assert t.params["head.options.attn_dim"] in (4, 8, 12)
    values = [t["val_auc"] for t in summary["trials"]]
    assert values == sorted(values, reverse=True)
    again = fake(table)
    run_sweep(config)
    assert again.calls == []


def test_a_changed_spec_is_refused_naming_the_key(tmp_path, fake):
    fake({0.001: (0.7, 0.5), 0.003: (0.8, 0.5)})
    run_sweep(from_dict(base_dict(tmp_path, {"params": {"train.lr": [0.001]}})))
    changed = from_dict(base_dict(tmp_path, {"params": {"train.lr": [0.003]}}))
    with pytest.raises(ConfigError, match=r"^sweep\.params: study 'tiahnm-sweep'"):
        run_sweep(changed)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({}, "sweep.params: give at least one config key"),
        ({"method": "random", "params": {"train.lr": [0.1]}}, "sweep.method: 'random'"),
        (
            {"metric": "test_auc", "params": {"train.lr": [0.1]}},
            "sweep.metric: 'test_auc' is not a validation metric",
        ),
        ({"metric": "auc", "params": {"train.lr": [0.1]}}, "sweep.metric: 'auc'"),
        (
            {"method": "optuna", "params": {"train.lr": [0.1]}},
            "sweep.n_trials: an optuna search needs",
        ),
        (
            {"params": {"train.lr": 0.1}},
            "sweep.params.train.lr: expected a non-empty list",
        ),
        (
            {"params": {"train.lr": []}},
            "sweep.params.train.lr: expected a non-empty list",
        ),
        (
            {"params": {"train.lr": {"low": 0.1, "high": 1}}},
            "sweep.params.train.lr: a grid needs a list",
        ),
        (
            {
                "method": "optuna",
                "n_trials": 2,
                "params": {"train.lr": {"low": 1, "high": 0.1}},
            },
            "sweep.params.train.lr: low (1) must be below high (0.1)",
        ),
        (
            {
                "method": "optuna",
                "n_trials": 2,
                "params": {"train.lr": {"low": 0, "high": 1, "log": True}},
            },
            "sweep.params.train.lr: log must be",
        ),
        (
            {"params": {"train.epoch": [1, 2]}},
            "sweep.params.train.epoch: Unknown config key 'train.epoch'",
        ),
        (
            {"params": {"train.epochs": ["a"]}},
            "sweep.params.train.epochs: train.epochs: expected int",
        ),
        (
            {"params": {"head.options.atn_dim": [4]}},
            "sweep.params.head.options.atn_dim: Unknown option head.options.atn_dim",
        ),
        (
            {"params": {"output_dir": ["a"]}},
            "sweep.params.output_dir: this key cannot be swept",
        ),
        (
            {"params": {"train.lr": [0.1, 0.1]}},
            "sweep.params.train.lr: repeated values",
        ),
    ],
)
def test_bad_sweep_specs_are_errors_naming_the_key(tmp_path, sweep, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_dict(tmp_path, sweep)))
    result = CliRunner().invoke(cli, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    assert (
        f"Error: {path}: {message}" in result.output
        or f"Error: {message}" in result.output
    ), result.output
    assert not (tmp_path / "out" / "trials").exists()


@pytest.mark.slow
def test_parallel_jobs_run_real_trials_in_separate_processes(tmp_path):
    """Two worker processes take the two grid points from the SQLite study; each
    trial is a normal run whose validation AUC is the one ranked."""
    import os

    sweep = {"params": {"train.lr": [0.002, 0.01]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_dict(tmp_path, sweep)))
    result = CliRunner().invoke(cli, ["sweep", str(path), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    done = [t for t in trials(out) if t.state.name == "COMPLETE"]
    assert len(done) == 2
    pids = {t.user_attrs["pid"] for t in done}
    assert len(pids) == 2 and os.getpid() not in pids
    summary = json.loads((out / "sweep_summary.json").read_text())
    for row in summary["trials"]:
        trial_dir = out / row["dir"]
        run = json.loads((trial_dir / "summary.json").read_text())
        assert row["val_auc"] == run["val_metrics"]["auc"]["mean"]
        saved = yaml.safe_load((trial_dir / "config.yaml").read_text())
        assert saved["train"]["lr"] == row["params"]["train.lr"]
        assert saved["output_dir"] == str(trial_dir)
        assert (trial_dir / "stages.json").is_file()
    assert summary["best"]["test_metrics"]["auc"]["n"] == 2


def test_two_launches_sharing_a_storage_split_the_grid(tmp_path, fake, monkeypatch):
    """Two `tiahnm sweep` launches (two machines) on one --storage database: every
    point runs, each is ranked once, and both launches write the same ranking."""
    import threading
    import time

    table = {lr: (lr, 0.5) for lr in (0.001, 0.002, 0.003, 0.004)}
    pipeline = fake(table)
    slow = FakePipeline.__call__

    def call(self, config, echo=None):
        time.sleep(0.3)  # trials overlap between the launches
        return slow(self, config, echo)

    monkeypatch.setattr(FakePipeline, "__call__", call)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    config = from_dict(base_dict(tmp_path, {"params": {"train.lr": list(table)}}))
    summaries, errors = [], []

    def launch():
        try:
            summaries.append(run_sweep(config, storage=storage))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    ids = [[r["id"] for r in s["trials"]] for s in summaries]
    assert len(ids[-1]) == len(set(ids[-1])) == 4
    assert sorted(pipeline.calls) == sorted(table) or set(pipeline.calls) == set(table)
    assert summaries[-1]["best"]["params"] == {"train.lr": 0.004}
    assert not (tmp_path / "out" / "sweep.db").exists()  # the given storage only


def test_one_queued_trial_is_popped_by_one_storage_only(tmp_path):
    """Eight storages on one SQLite file set one WAITING trial RUNNING at once:
    exactly one wins, every time. (Optuna's plain RDBStorage lets several win on
    SQLite, where ``FOR UPDATE`` is a no-op: 13 of 20 rounds here; in CI two sweep
    workers ran the same grid point.)"""
    import threading

    import optuna
    from optuna.trial import TrialState

    from tiahnm.sweep import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for rep in range(10):
        url = f"sqlite:///{tmp_path / f's{rep}.db'}"
        study = optuna.create_study(study_name="s", storage=make_storage(url))
        study.enqueue_trial({"x": 1})
        trial_id = study.get_trials(states=(TrialState.WAITING,))[0]._trial_id
        storages = [make_storage(url) for _ in range(8)]
        barrier, wins = threading.Barrier(len(storages)), []

        def pop(storage, barrier=barrier, wins=wins, trial_id=trial_id):
            barrier.wait()
            wins.append(storage.set_trial_state_values(trial_id, TrialState.RUNNING))

        threads = [threading.Thread(target=pop, args=(s,)) for s in storages]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wins.count(True) == 1, (rep, wins)
