"""The explicit state of a training run, to and from its checkpoint.

:func:`tiahnm.training.loop.fit` advances a :class:`TrainingState` epoch by epoch;
everything that decides what the next epoch does (round, epoch, optimiser step
counter, early-stopping counter, best states, history, generated bags) lives here,
so a checkpoint is this state plus the modules' and optimiser's state dicts, and a
resumed run continues with exactly the numbers an uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tiahnm.runtime.checkpoint import cpu_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.data.bag import Bag

#: Score of a round before its first validation (any real score beats it).
NO_SCORE = (-math.inf, -math.inf)


@dataclass
class RoundBest:
    """The best epoch of the current round (by the monitored validation score).

    Attributes:
        score (tuple[float, float]): Monitor score (higher is better).
        epoch (int): Its epoch (-1: none yet).
        state (dict | None): The head's state dict at that epoch (CPU).
        bad_epochs (int): Epochs since the last improvement (early stopping).
    """

    score: tuple[float, ...] = NO_SCORE
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0


@dataclass
class OverallBest:
    """The best over every finished round (validation only).

    Attributes:
        score (tuple | None): Its round's best score (None: no round finished).
        epoch (int): Its epoch within that round.
        state (dict | None): The head's state dict.
        round (int): The round it came from.
    """

    score: tuple[float, ...] | None = None
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None
    round: int = 0

    def keep_better(self, best: RoundBest, round_idx: int, *, has_val: bool) -> None:
        """Take the round's best when it beats the rounds before.

        Without validation bags the latest round wins; on a tie the earlier round stays.
        """
        if self.score is None or not has_val or best.score > tuple(self.score):
            self.score = tuple(best.score)
            self.epoch = best.epoch
            self.state = best.state
            self.round = round_idx


@dataclass
class TrainingState:
    """Where a run is: what the next epoch needs and what has been kept so far.

    Attributes:
        round (int): Current round (0-based).
        epoch (int): Next epoch to run in this round.
        step (int): Optimiser steps taken in this round (every miner hook gets it).
        stopped (bool): This round stopped early (its remaining epochs are skipped).
        history (list[dict]): One row per finished epoch, every round.
        best (RoundBest): The current round's best epoch.
        overall (OverallBest): The best over finished rounds.
        added_bags (list[Bag]): Bags miners generated so far (training set additions).
    """

    round: int = 0
    epoch: int = 0
    step: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    best: RoundBest = field(default_factory=RoundBest)
    overall: OverallBest = field(default_factory=OverallBest)
    added_bags: list[Bag] = field(default_factory=list)

    def record_epoch(
        self, row: dict[str, float], score: tuple[float, ...], head: torch.nn.Module
    ) -> None:
        """Append the epoch's row; keep the head's state when ``score`` improves."""
        if score > self.best.score:
            self.best = RoundBest(tuple(score), self.epoch, cpu_state_dict(head), 0)
        else:
            self.best.bad_epochs += 1
        self.history.append(row)

    def next_round(self) -> None:
        """Start the next round: epoch and step counters and the round's best reset."""
        self.round += 1
        self.epoch = 0
        self.step = 0
        self.stopped = False
        self.best = RoundBest()

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (a ``weights_only`` checkpoint)."""
        return {
            "round": self.round,
            "epoch": self.epoch
            - 1,  # the last finished epoch, as checkpoints always held
            "step": self.step,
            "stopped": self.stopped,
            "history": [dict(r) for r in self.history],
            "best_score": list(self.best.score),
            "best_epoch": self.best.epoch,
            "best_state": self.best.state,
            "bad_epochs": self.best.bad_epochs,
            "overall_best": {
                "score": None
                if self.overall.score is None
                else list(self.overall.score),
                "epoch": self.overall.epoch,
                "state": self.overall.state,
                "round": self.overall.round,
            },
            "added_bags": [_bag_to_dict(b) for b in self.added_bags],
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainingState:
        """The state :meth:`to_dict` saved.

        A checkpoint from before the step counter has step 0 (the loop sets it from
        the epoch).
        """
        overall = saved.get("overall_best") or {}
        score = overall.get("score")
        epoch = int(saved["epoch"]) + 1
        return cls(
            round=int(saved["round"]),
            epoch=epoch,
            step=int(saved.get("step", 0)),
            stopped=bool(saved.get("stopped", False)),
            history=list(saved["history"]),
            best=RoundBest(
                tuple(saved["best_score"]),
                int(saved["best_epoch"]),
                saved["best_state"],
                int(saved["bad_epochs"]),
            ),
            overall=OverallBest(
                None if score is None else tuple(score),
                int(overall.get("epoch", -1)),
                overall.get("state"),
                int(overall.get("round", 0)),
            ),
            added_bags=[_bag_from_dict(item) for item in saved.get("added_bags", [])],
        )


def _bag_to_dict(bag: Bag) -> dict[str, Any]:
    return {
        "slide_id": bag.slide_id,
        "label": bag.label,
        "features": bag.features.cpu(),
    }


def _bag_from_dict(item: dict[str, Any]) -> Bag:
    from tiahnm.data.bag import Bag

    return Bag(
        slide_id=str(item["slide_id"]),
        label=int(item["label"]),
        features=item["features"],
        origin="generated",
    )


__all__ = ["NO_SCORE", "OverallBest", "RoundBest", "TrainingState"]
