"""The :class:`Miner` protocol: the hooks a miner may override in the shared loop.

The shared loop (:func:`tiahnm.training.loop.fit`) calls, for each training round::

    miner.on_fit_start(ctx)
    for epoch:
        miner.on_epoch_start(ctx, epoch)
        for batch in miner.batches(ctx, train_bags, generator):   # lists of bags
            for bag in batch: out, extra = miner.forward(ctx, bag, step)
            loss = mean(task loss(out, bag) + sum(extra)) + sum(w * loss(outs, labels))
            optimizer step
            miner.after_step(ctx, step)
    new_bags = miner.on_round_end(ctx, train_bags)   # bags to add before the next round

A miner overrides only what it needs: MHIM overrides ``forward`` (teacher scoring,
masking, consistency) and ``after_step`` (EMA), HNM overrides ``batches`` (bag pairs)
and Li 2019 overrides ``on_round_end`` (generated hard-negative bags).

Training a miner runs itself (Li 2019's out-of-fold models, HNM's encoder
fine-tuning) goes through ``ctx.sub`` (:class:`SubTraining`), which the loop fills
with its device, precision, processes and checkpoint folder; a miner never imports
the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.data.bag import Bag
    from tiahnm.heads.base import MILHead, MILOutput


@dataclass
class SubFitResult:
    """What :meth:`SubTraining.fit` returns.

    Attributes:
        best_state (dict): The kept state dict (best on validation; without
            validation bags the last epoch's).
        best_epoch (int): Its epoch.
        history (list[dict]): One row per epoch.
    """

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]]


class SubTraining:
    """Training a miner runs itself, under the shared loop's runtime.

    The loop sets ``FitContext.sub`` to an implementation that uses the run's device,
    autocast precision (``train.amp`` / ``train.cpu_precision``), process group
    (gradients averaged over ``torchrun`` processes) and checkpoint folder, so
    inner training gets AMP, DDP and resumable checkpoints as the outer loop has.
    This base class is what a :class:`FitContext` built by hand gets: it refuses.
    """

    def fit(
        self,
        head: MILHead,
        train_bags: Sequence[Bag],
        val_bags: Sequence[Bag] = (),
        *,
        key: str,
        seed: int,
        epochs: int,
        lr: float,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        patience: int | None = None,
    ) -> SubFitResult:
        """Train ``head`` in place with the shared loop (one round, plain miner).

        Args:
            head (MILHead): The model to train (a miner's copy, never ``ctx.head``).
            train_bags (Sequence[Bag]): Its training bags.
            val_bags (Sequence[Bag]): Validation bags (none: the last epoch is kept).
            key (str): Names this inner fit within the round (its checkpoint folder).
            seed (int): Seed of its shuffling and of the torch RNG inside it (the
                outer random stream is untouched).
            epochs (int): Epochs.
            lr (float): Learning rate (Adam).
            weight_decay (float): Weight decay.
            scheduler (str): ``none``, ``cosine`` or ``step``.
            patience (int | None): Early-stopping patience (default: ``epochs``).

        Returns:
            SubFitResult: The kept state, its epoch and the history.
        """
        raise NotImplementedError(self._refusal("fit"))

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast of the run's training precision (a no-op in full precision)."""
        return contextlib.nullcontext()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        loss: torch.Tensor,
    ) -> float:
        """One optimiser step on ``loss``; returns the loss value.

        Backward (scaled under fp16), gradients averaged over the processes, step.
        """
        raise NotImplementedError(self._refusal("step"))

    def _refusal(self, what: str) -> str:
        return (
            f"SubTraining.{what}: this FitContext has no training runtime; the "
            "shared loop (tiahnm.training.loop.fit) provides one, or build it with "
            "tiahnm.training.loop.sub_training(device)."
        )


@dataclass
class FitContext:
    """State the shared loop shares with the miner.

    Attributes:
        head (MILHead): The student head being trained.
        device (torch.device): Where the head lives.
        epochs (int): Epochs in this round.
        steps_per_epoch (int): Optimiser steps per epoch: ``Miner.n_steps`` miner
            batches grouped ``train.batch_size`` per step.
        round (int): Training round index (0-based).
        generator (torch.Generator): The loop's seeded CPU generator.
        state (dict): Free space for a miner within one run. It is NOT checkpointed:
            what must survive a resume belongs in :meth:`Miner.state_dict`.
        bag (Bag | None): The training bag being forwarded (set by the loop before
            :meth:`Miner.forward`), e.g. to record what was mined in it.
        sub (SubTraining): Inner training under the loop's runtime (set by the loop).
        round_best_score (tuple | None): The finished round's best validation score
            (set by the loop before :meth:`Miner.on_round_end`; None before).
        monitor (str | None): ``train.monitor`` that score is of (None: the run has no
            validation bags, so the score is not a validation score).
    """

    head: MILHead
    device: torch.device
    epochs: int
    steps_per_epoch: int
    round: int = 0
    generator: torch.Generator | None = None
    state: dict[str, Any] = field(default_factory=dict)
    bag: Bag | None = None
    sub: SubTraining = field(default_factory=SubTraining)
    round_best_score: tuple[float, ...] | None = None
    monitor: str | None = None

    @property
    def total_steps(self) -> int:
        """Total optimiser steps of this round."""
        return self.epochs * self.steps_per_epoch


#: At most this many mined records are kept per miner and fold (``mined.json``).
MAX_MINED_RECORDS = 400


class Miner:
    """Plain training: every bag, shuffled, one per step. Subclass to mine.

    What a miner mined is shown in the run's ``report.html``: call
    :meth:`record_mined` with the instances (any miner, a plugin's too); each ``kind``
    becomes one gallery. The loop writes :meth:`mined_records` to the fold's
    ``mined.json``.

    Class attributes:
        name (str): The registered name.
        supported_tasks (tuple[str, ...]): Tasks (:mod:`tiahnm.tasks`) the miner
            works with; another task is a config error naming both before training.
    """

    name = "none"
    supported_tasks: tuple[str, ...] = (
        "binary",
        "multiclass",
        "survival",
        "regression",
    )

    def record_mined(
        self,
        kind: str,
        bag: Bag,
        indices: Sequence[int],
        *,
        step: str,
        scores: Sequence[float] | None = None,
    ) -> None:
        """Remember instances of ``bag`` this miner picked (cheap: ids and indices).

        Args:
            kind (str): Gallery title, e.g. ``"masked high-score instances"``.
            bag (Bag): The bag (a real slide; generated bags have no patches).
            indices (Sequence[int]): Instance indices within the bag.
            step (str): When, e.g. ``"epoch 3"`` or ``"round 1"``.
            scores (Sequence[float] | None): The score each was picked by.
        """
        records = self.__dict__.setdefault("_mined", [])
        if len(records) >= MAX_MINED_RECORDS:
            return
        idx = [int(i) for i in indices]
        coords = None
        if bag.coords is not None:
            coords = [[int(v) for v in bag.coords[i][:2]] for i in idx]
        records.append(
            {
                "kind": kind,
                "step": step,
                "slide_id": bag.slide_id,
                "label": int(bag.label),
                "source": None if bag.source is None else str(bag.source),
                "indices": idx,
                "coords": coords,
                "scores": None if scores is None else [float(v) for v in scores],
                # slide-patch bags (source: the slide) know their patch footprint
                "patch_size_level0": bag.meta.get("patch_size_level0"),
            }
        )

    def mined_records(self) -> list[dict[str, Any]]:
        """Records of :meth:`record_mined` (override to report from elsewhere)."""
        return list(self.__dict__.get("_mined", []))

    def on_fit_start(self, ctx: FitContext) -> None:
        """Called once per round before the first epoch."""

    def on_epoch_start(self, ctx: FitContext, epoch: int) -> None:
        """Called at the start of every epoch."""

    def batches(
        self, ctx: FitContext, bags: Sequence[Bag], generator: torch.Generator
    ) -> Iterator[list[Bag]]:
        """Yield the bags of one epoch, one optimiser step per yielded list."""
        order = torch.randperm(len(bags), generator=generator).tolist()
        for i in order:
            yield [bags[i]]

    def n_steps(self, bags: Sequence[Bag]) -> int:
        """Miner batches per epoch that :meth:`batches` yields for ``bags``.

        The loop checks every epoch's batches against it (a mismatch is an error
        naming the miner): it is the one declaration of the epoch length a miner's
        schedules (``ctx.steps_per_epoch``, ``ctx.total_steps``) rest on.
        """
        return len(bags)

    def forward(
        self, ctx: FitContext, features: torch.Tensor, label: torch.Tensor, step: int
    ) -> tuple[MILOutput, dict[str, torch.Tensor]]:
        """Forward one training bag; return the output and extra weighted losses."""
        out = ctx.head(
            features, label=label if ctx.head.needs_label_in_forward else None
        )
        return out, {}

    def after_step(self, ctx: FitContext, step: int) -> None:
        """Called after every optimiser step (e.g. to update an EMA teacher)."""

    def epoch_stats(self) -> dict[str, float]:
        """Numbers to add to the epoch's history row (e.g. mean masked fraction)."""
        return {}

    def on_round_end(self, ctx: FitContext, train_bags: Sequence[Bag]) -> list[Bag]:
        """Return new bags for the next round's training set (default: none)."""
        return []

    def modules(self) -> dict[str, torch.nn.Module]:
        """Extra modules the miner trains or keeps (checkpointed with the head)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values to checkpoint (loaded with ``weights_only``)."""
        return {name: m.state_dict() for name, m in self.modules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, module in self.modules().items():
            if name in state:
                module.load_state_dict(state[name])
