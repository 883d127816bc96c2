import csv
import json

import numpy as np
import pytest

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.config import from_dict
from tiahnm.crossval import run_training
from tiahnm.hookspecs import hookimpl
from tiahnm.miners.base import Miner
from tiahnm.plugins import get_plugin_manager

SPIES: list["SpyMiner"] = []


class SpyMiner(Miner):
    """Records every bag the loop trains on."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        SPIES.append(self)

    def batches(self, ctx, bags, generator):
        for batch in super().batches(ctx, bags, generator):
            self.seen.update(b.slide_id for b in batch)
            yield batch


class SpyPlugin:
    @hookimpl
    def tiahnm_register_miners(self, register):
        register("spy", SpyMiner)


def config(tmp_path, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv_path = tmp_path / "bags.csv"
    write_mil_csv(csv_path, make_bags(24))
    data = {
        "output_dir": str(tmp_path / "out"),
        "data": {"source": "mil_csv", "options": {"path": str(csv_path)}},
        "head": {"name": "abmil", "options": {"embed_dim": 16, "attn_dim": 8}},
        "train": {"epochs": 3, "lr": 0.005, "progress": False},
        "cv": {"folds": 3, "repeats": 2, "val_fraction": 0.2},
    }
    for key, value in over.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return from_dict(data)


def read_splits(path):
    folds: dict[tuple[str, str], dict[str, set[str]]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            folds.setdefault(
                (row["repeat"], row["fold"]),
                {"train": set(), "val": set(), "test": set()},
            )[row["split"]].add(row["slide_id"])
    return folds


@pytest.mark.parametrize("refit", [False, True])
def test_training_never_sees_test_bags(tmp_path, refit):
    SPIES.clear()
    get_plugin_manager().register(SpyPlugin(), name="spy")
    cfg = config(tmp_path, miner__name="spy", cv__refit=refit)
    run_training(cfg)
    folds = read_splits(tmp_path / "out" / "splits.csv")
    fold_spies = SPIES[1:]  # the first miner is built only to validate the config
    per_fold = 2 if refit else 1
    assert len(fold_spies) == per_fold * len(folds)
    for i, (_, split) in enumerate(
        sorted(folds.items(), key=lambda kv: (int(kv[0][0]), int(kv[0][1])))
    ):
        first = fold_spies[per_fold * i]
        assert first.seen == split["train"]
        if refit:
            assert fold_spies[per_fold * i + 1].seen == split["train"] | split["val"]
        assert not (first.seen & split["test"])


def test_refit_writes_results_and_cleans_checkpoints(tmp_path):
    cfg = config(tmp_path, cv__refit=True)
    summary = run_training(cfg)
    assert summary["n_folds"] == 6
    fold = tmp_path / "out" / "folds" / "r0_f0"
    assert (fold / "best.pt").is_file()
    assert not (fold / "last.pt").exists()
    assert not (fold / "refit" / "last.pt").exists()
    result = json.loads((fold / "result.json").read_text())
    assert result["n_train"] + result["n_test"] == 24


def test_summary_shape_and_determinism(tmp_path):
    a = run_training(config(tmp_path / "a"))
    b = run_training(config(tmp_path / "b"))
    assert a["metrics"] == b["metrics"]
    assert set(a["metrics"]) >= {"auc", "accuracy", "f1", "balanced_accuracy"}
    assert set(a["repeat_metrics"]["accuracy"]) == {"mean", "std", "n"}
    assert a["repeat_metrics"]["accuracy"]["n"] == 2
    # over folds: mean and sample std of the 6 fold values; over repeats: of the
    # 2 repeat means (each of its 3 folds)
    for key in ("auc", "accuracy"):
        values = {(f["repeat"], f["fold"]): f["metrics"][key] for f in a["folds"]}
        assert sorted(values) == [(r, f) for r in range(2) for f in range(3)]
        got = a["metrics"][key]
        assert got["mean"] == pytest.approx(np.mean(list(values.values())))
        assert got["std"] == pytest.approx(np.std(list(values.values()), ddof=1))
        means = [np.mean([values[r, f] for f in range(3)]) for r in range(2)]
        assert a["repeat_metrics"][key]["mean"] == pytest.approx(np.mean(means))
        assert a["repeat_metrics"][key]["std"] == pytest.approx(np.std(means, ddof=1))
    assert a["repeat_metrics"]["accuracy"]["std"] > 0  # the repeats differ
    assert "instance_auc" not in a["metrics"]  # the CSV carries no instance labels


def test_miner_options_name_the_fold(tmp_path):
    from tiahnm.crossval import build_miner
    from tiahnm.training.splits import Fold

    seen = []

    class Recorder(Miner):
        def __init__(self, path: str = "") -> None:
            seen.append(path)

    class RecorderPlugin:
        @hookimpl
        def tiahnm_register_miners(self, register):
            register("recorder", Recorder)

    get_plugin_manager().register(RecorderPlugin(), name="recorder")
    cfg = config(tmp_path, miner__name="recorder")
    cfg.miner.options = {
        "path": "{output_dir}/base/{fold_name}/best.pt {repeat}-{fold} {other}"
    }
    build_miner(cfg, Fold(2, 3, (), (), ()))
    assert seen == [f"{cfg.output_dir}/base/r2_f3/best.pt 2-3 {{other}}"]
