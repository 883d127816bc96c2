"""A tiny cross-validated run for the callback tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.callbacks.base import Callback, RunInfo
from tiahnm.config import from_dict
from tiahnm.hookspecs import hookimpl


def tiny_config(tmp_path: Path, callbacks: list[dict[str, Any]], **train: Any):
    csv_path = tmp_path / "bags.csv"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not csv_path.is_file():
        write_mil_csv(csv_path, make_bags(24))
    return from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "data": {"source": "mil_csv", "options": {"path": str(csv_path)}},
            "head": {"name": "abmil", "options": {"embed_dim": 16, "attn_dim": 8}},
            "train": {"epochs": 3, "lr": 0.005, "progress": False, **train},
            "cv": {"folds": 2, "val_fraction": 0.25},
            "evaluation": {"bootstrap": 0, "report": False},
            "callbacks": callbacks,
        }
    )


def fold_results(out: Path) -> dict[str, dict[str, Any]]:
    return {
        p.parent.name: json.loads(p.read_text())
        for p in sorted((out / "folds").glob("*/result.json"))
    }


class Interrupt(Callback):
    """Raises KeyboardInterrupt (a kill) once, at one epoch of one fold."""

    armed = True

    def __init__(self, fold: str = "r0_f1", epoch: int = 1) -> None:
        self.fold, self.epoch = fold, epoch

    def on_epoch_end(self, run: RunInfo, row: dict[str, float]) -> None:
        if Interrupt.armed and run.fold == self.fold and row["epoch"] == self.epoch:
            Interrupt.armed = False
            raise KeyboardInterrupt


class Boom(Callback):
    def on_epoch_end(self, run: RunInfo, row: dict[str, float]) -> None:
        raise ValueError("disk full")


class CallbackTestPlugin:
    @hookimpl
    def tiahnm_register_callbacks(self, register):
        register("interrupt", Interrupt)
        register("boom", Boom)
