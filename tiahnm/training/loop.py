"""The shared training loop used by every head and miner.

One bag per forward pass (heads take ``[N, D]``); a miner batch is whatever the
miner's :meth:`~tiahnm.miners.Miner.batches` yields, and an optimiser step takes
``cfg.batch_size`` miner batches (1 by default: one step per miner batch). Under
``torchrun`` the miner batches of a step are dealt round robin to the processes and
the gradients averaged (:mod:`tiahnm.runtime.distributed`), which gives the same
update as one process taking the whole step. Model selection and early stopping use
the validation bags only.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tiahnm.errors import ConfigError, DataError, TrainingDivergedError
from tiahnm.miners.base import FitContext, Miner, SubFitResult, SubTraining
from tiahnm.runtime.checkpoint import load_checkpoint, save_checkpoint
from tiahnm.runtime.device import amp_dtype, autocast
from tiahnm.runtime.distributed import (
    SINGLE,
    DistContext,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_sum,
    broadcast_modules,
    current,
    shard,
    unshard,
)
from tiahnm.training.feeding import iter_features, pin_bags
from tiahnm.training.precision import head_precision
from tiahnm.training.state import TrainingState

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.config import TrainConfig
    from tiahnm.data.bag import Bag
    from tiahnm.heads.base import MILHead
    from tiahnm.losses.base import BatchLoss
    from tiahnm.tasks.base import Task


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_bags: list[Bag] = field(default_factory=list)
    seconds_per_epoch: float = math.nan
    #: The autocast dtype training and validation ran under (None: full precision).
    autocast_dtype: torch.dtype | None = None
    best_round: int = 0


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD as configured."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch schedule (after ``cfg.warmup_epochs`` of linear warm-up), or None.

    The warm-up rises linearly from ``lr / 10`` to ``lr`` over the warm-up epochs;
    the cosine schedule then spans the remaining epochs.
    """
    sched = torch.optim.lr_scheduler
    warm = min(cfg.warmup_epochs, cfg.epochs - 1)
    main: sched.LRScheduler | None = None
    if cfg.scheduler == "cosine":
        main = sched.CosineAnnealingLR(opt, T_max=max(cfg.epochs - warm, 1))
    elif cfg.scheduler == "step":
        main = sched.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if warm <= 0:
        return main
    ramp = sched.LinearLR(opt, start_factor=0.1, total_iters=warm)
    if main is None:
        return ramp
    return sched.SequentialLR(opt, [ramp, main], milestones=[warm])


@torch.inference_mode()
def predict(
    head: MILHead,
    bags: Sequence[Bag],
    device: torch.device,
    *,
    amp: torch.dtype | None = None,
    instance_scores: bool = False,
    dist_ctx: DistContext = SINGLE,
    prefetch: int = 0,
    task: Task | None = None,
) -> tuple[np.ndarray, float, list[np.ndarray] | None]:
    """Deterministic forward over ``bags``.

    ``task`` (default: binary / multiclass by ``head.n_classes``) gives each bag's
    output row (class probabilities, or ``[risk, logits...]`` for survival) and loss.

    With a multi-process ``dist_ctx`` every rank predicts its shard of ``bags`` and
    the results are gathered in the original order on every rank (a collective
    call: every rank must make it).

    Returns:
        tuple: ``(probs [n, C], mean loss, instance scores per bag or None)``.
    """
    task = task or _default_task(head)
    was_training = head.training
    head.eval()
    mine = shard(bags, dist_ctx)
    probs, losses, scores = [], [], []
    for bag, x in zip(
        mine, iter_features(mine, device, prefetch=prefetch), strict=True
    ):
        with autocast(device, amp):
            out = head(x)
            losses.append(task.bag_loss(head, out, bag).float())
        probs.append(task.outputs(out))
        if instance_scores:
            scores.append(head.instance_scores(out).float().cpu().numpy())
    head.train(was_training)
    if dist_ctx.enabled:
        part = (
            [p.cpu() for p in probs],
            [v.cpu() for v in losses],
            scores if instance_scores else None,
        )
        parts = all_gather_objects(part, dist_ctx)
        probs = unshard([p[0] for p in parts], len(bags))
        losses = unshard([p[1] for p in parts], len(bags))
        if instance_scores:
            scores = unshard([p[2] for p in parts], len(bags))
    if not bags:
        return np.zeros((0, head.n_classes)), math.nan, None
    p = torch.stack([v.cpu() for v in probs]).numpy().astype(np.float64)
    loss = float(torch.stack([v.cpu() for v in losses]).mean())
    coupled = task.eval_loss(p, bags)
    if coupled is not None:
        loss = coupled
    return p, loss, (scores if instance_scores else None)


def _default_task(head: MILHead) -> Task:
    from tiahnm.tasks import default_task

    return default_task(head.n_classes)


def _check_cfg(cfg: TrainConfig) -> None:
    for name in ("batch_size", "loader_workers"):
        if getattr(cfg, name) < 1:
            msg = f"train.{name} must be >= 1, got {getattr(cfg, name)}."
            raise ConfigError(msg)
    if cfg.prefetch < 0:
        msg = f"train.prefetch must be >= 0, got {cfg.prefetch}."
        raise ConfigError(msg)


def compile_head(head: MILHead, *, backend: str = "inductor") -> MILHead:
    """``torch.compile`` ``head`` in place with dynamic shapes.

    Bag sizes vary from bag to bag: with ``dynamic=True`` the instance axis is
    symbolic from the first compilation, so new sizes reuse the graph instead of
    recompiling. Compiling in place keeps the state-dict keys (checkpoints stay
    loadable without compile).
    """
    head.compile(dynamic=True, backend=backend)
    return head


def group_steps(batches: Sequence[list[Bag]], size: int) -> list[list[list[Bag]]]:
    """Consecutive miner batches grouped ``size`` per optimiser step."""
    return [list(batches[i : i + size]) for i in range(0, len(batches), size)]


@dataclass
class _Run:
    """What stays fixed during one :func:`fit` call (set up by :func:`_prepare`)."""

    head: MILHead
    cfg: TrainConfig
    miner: Miner
    losses: Sequence[tuple[BatchLoss, float]]
    device: torch.device
    dtype: torch.dtype | None
    ckpt_path: Path | None
    batched: bool
    train_bags: list[Bag]
    val_bags: Sequence[Bag]
    dctx: DistContext
    task: Task
    generator: torch.Generator
    on_epoch_end: Callable[[dict[str, float]], None] | None
    epoch_seconds: list[float] = field(default_factory=list)
    compiled: bool = False


@dataclass
class _Round:
    """The optimisation tools of one round."""

    ctx: FitContext
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler


def fit(
    head: MILHead,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    cfg: TrainConfig,
    *,
    miner: Miner | None = None,
    losses: Sequence[tuple[BatchLoss, float]] = (),
    device: torch.device | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    dist_ctx: DistContext | None = None,
    task: Task | None = None,
) -> FitResult:
    """Train ``head`` with the shared loop; return the best (validation) state.

    The run advances a :class:`~tiahnm.training.state.TrainingState` (round, epoch,
    optimiser step, best states, history), which is what ``last.pt`` holds besides
    the modules' and the optimiser's state.

    Args:
        head (MILHead): Freshly initialised head.
        train_bags (Sequence[Bag]): Training bags.
        val_bags (Sequence[Bag]): Validation bags for model selection and early
            stopping (if empty, the last epoch is kept).
        cfg (TrainConfig): Loop settings.
        miner (Miner | None): Miner (default: plain training).
        losses (Sequence[tuple[BatchLoss, float]]): Extra losses and their weights.
        device (torch.device | None): Device (default CPU).
        seed (int): Seed of shuffling and of the miner's randomness (the same on
            every rank).
        checkpoint_dir (str | Path | None): Where ``last.pt`` is written every
            ``cfg.checkpoint_every`` epochs (by rank 0); an existing ``last.pt`` is
            resumed (by every rank). Miners' inner training checkpoints below it.
        on_epoch_end (Callable | None): Called with each epoch's history row.
        dist_ctx (DistContext | None): Multi-process context (default: the joined
            process group, if any).
        task (Task | None): Loss, outputs and monitor (default: binary or
            multiclass by ``head.n_classes``); fitted on ``train_bags`` here.

    Returns:
        FitResult: Best state dict, its epoch and the history (the same on every rank).
    """
    _check_cfg(cfg)
    task = task or _default_task(head)
    task.fit(train_bags)
    run = _prepare(
        head,
        train_bags,
        val_bags,
        cfg,
        miner=miner or Miner(),
        losses=losses,
        device=device or torch.device("cpu"),
        checkpoint_dir=checkpoint_dir,
        dctx=dist_ctx if dist_ctx is not None else current(),
        task=task,
        generator=torch.Generator().manual_seed(seed),
        on_epoch_end=on_epoch_end,
    )
    saved = _load_resume(run)
    state = TrainingState() if saved is None else _saved_state(run, saved)
    run.train_bags.extend(state.added_bags)
    while state.round < cfg.rounds:
        tools = _start_round(run, state.round)
        if saved is not None:
            _restore(run, tools, saved)
            if "step" not in saved:  # a checkpoint from before the step counter
                state.step = state.epoch * tools.ctx.steps_per_epoch
            saved = None
        _run_epochs(run, tools, state)
        _end_round(run, tools, state)
    return _result(run, state)


def _prepare(
    head: MILHead,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    cfg: TrainConfig,
    *,
    miner: Miner,
    losses: Sequence[tuple[BatchLoss, float]],
    device: torch.device,
    checkpoint_dir: str | Path | None,
    **fixed: Any,
) -> _Run:
    """Place the head, choose the precision, build the run.

    ``fixed``: the rest of :class:`_Run` (``dctx``, ``task``, ``generator``,
    ``on_epoch_end``), as :func:`fit` resolved them.
    """
    head.to(device)
    bags = list(train_bags)
    dtype = _autocast_dtype(head, bags, device, cfg)
    if cfg.pin_memory:
        bags = pin_bags(bags, device)
    return _Run(
        head=head,
        cfg=cfg,
        miner=miner,
        losses=losses,
        device=device,
        dtype=dtype,
        ckpt_path=Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None,
        batched=_can_pad(head, miner, losses) if cfg.pad_batches else False,
        train_bags=bags,
        val_bags=val_bags,
        **fixed,
    )


def _load_resume(run: _Run) -> dict[str, Any] | None:
    if run.ckpt_path is not None and run.ckpt_path.is_file():
        return load_checkpoint(run.ckpt_path)
    return None


def _start_round(run: _Run, round_idx: int) -> _Round:
    """The round's context, the miner's start, the optimiser and schedule."""
    head, miner, cfg = run.head, run.miner, run.cfg
    n_miner_batches = max(1, miner.n_steps(run.train_bags))
    ctx = FitContext(
        head=head,
        device=run.device,
        epochs=cfg.epochs,
        steps_per_epoch=-(-n_miner_batches // cfg.batch_size),
        round=int(round_idx),
        generator=run.generator,
        sub=_LoopSubTraining(
            run.device,
            cfg=cfg,
            dtype=run.dtype,
            dist_ctx=run.dctx,
            checkpoint_dir=run.ckpt_path.parent if run.ckpt_path else None,
            round_idx=int(round_idx),
        ),
    )
    # Before the optimiser exists, so a miner can build trainable modules here.
    miner.on_fit_start(ctx)
    if cfg.compile and not run.compiled:
        # after on_fit_start: a miner's copy of the head (MHIM teacher) stays eager
        compile_head(head)
        run.compiled = True
    params = list(head.parameters())
    for module in miner.modules().values():
        module.to(run.device)
        params += [p for p in module.parameters() if p.requires_grad]
    params = [p for p in params if p.requires_grad]
    broadcast_modules([head, *miner.modules().values()], run.dctx)
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype is torch.float16)
    return _Round(ctx, params, opt, sched, scaler)


def _not_resumable(run: _Run, exc: Exception) -> DataError:
    msg = (
        f"{run.ckpt_path}: this checkpoint was made by a run with other "
        f"settings and cannot be resumed ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0]}); delete it or use another output "
        "folder."
    )
    return DataError(msg)


def _saved_state(run: _Run, saved: dict[str, Any]) -> TrainingState:
    try:
        return TrainingState.from_dict(saved)
    except (KeyError, TypeError, ValueError) as exc:
        raise _not_resumable(run, exc) from None


def _restore(run: _Run, tools: _Round, saved: dict[str, Any]) -> None:
    """Load the checkpoint into the head, miner, optimiser, schedule and RNGs."""
    try:
        run.head.load_state_dict(saved["head"])
        run.miner.load_state_dict(saved["miner"])
        tools.opt.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise _not_resumable(run, exc) from None
    if tools.sched is not None and saved.get("scheduler") is not None:
        tools.sched.load_state_dict(saved["scheduler"])
    run.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    if run.device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], run.device)


def _run_epochs(run: _Run, tools: _Round, state: TrainingState) -> None:
    """The round's remaining epochs, each validated, recorded and checkpointed."""
    while not state.stopped and state.epoch < run.cfg.epochs:
        t0 = time.perf_counter()
        train_loss, n_skipped = _train_epoch(run, tools, state)
        run.epoch_seconds.append(time.perf_counter() - t0)
        row: dict[str, float] = {
            "round": state.round,
            "epoch": state.epoch,
            "train_loss": train_loss,
            **run.miner.epoch_stats(),
        }
        if run.cfg.nonfinite == "skip":
            row["nonfinite_steps"] = n_skipped
        score = _validate(run, state.epoch, row)
        state.record_epoch(row, score, run.head)
        if run.on_epoch_end is not None:
            run.on_epoch_end(row)
        state.stopped = (
            bool(run.val_bags)
            and state.best.bad_epochs >= run.cfg.patience
            and state.epoch + 1 >= run.cfg.min_epochs
        )
        state.epoch += 1
        if (
            state.stopped
            or state.epoch % run.cfg.checkpoint_every == 0
            or (state.epoch == run.cfg.epochs)
        ):
            _save(run, tools, state)


def _epoch_steps(run: _Run, ctx: FitContext) -> list[list[list[Bag]]]:
    """The epoch's miner batches, grouped per optimiser step (checked)."""
    batches = list(run.miner.batches(ctx, run.train_bags, run.generator))
    announced = max(1, run.miner.n_steps(run.train_bags))
    if len(batches) != announced and batches:
        msg = (
            f"miner {run.miner.name!r}: batches() yielded {len(batches)} batches "
            f"but n_steps() announced {announced} for {len(run.train_bags)} bags; "
            "the two must agree (the miner's schedules rest on n_steps)."
        )
        raise ConfigError(msg)
    steps = group_steps(batches, run.cfg.batch_size)
    if run.task.couples_bags:  # one loss over the bags of a step (Cox)
        steps = [[[b for batch in g for b in batch]] for g in steps]
    return steps


def _train_epoch(run: _Run, tools: _Round, state: TrainingState) -> tuple[float, int]:
    """One epoch of optimiser steps; returns (mean training loss, skipped steps)."""
    ctx = tools.ctx
    run.head.train()
    run.miner.on_epoch_start(ctx, state.epoch)
    steps = _epoch_steps(run, ctx)
    mine = [shard(group, run.dctx) for group in steps]
    feats = iter_features(
        [bag for part in mine for batch in part for bag in batch],
        run.device,
        prefetch=run.cfg.prefetch,
        workers=run.cfg.loader_workers,
    )
    loss_sum = torch.zeros((), device=run.device)
    n_skipped = 0
    for group, part in zip(steps, mine, strict=True):
        step_loss = _step_loss(run, tools, state, group, part, feats)
        if run.cfg.nonfinite == "skip" and _nonfinite_step(step_loss, run.dctx):
            tools.opt.zero_grad(set_to_none=True)  # skip this step (counted)
            n_skipped += 1
            state.step += 1
            continue
        loss_sum += step_loss
        _optimizer_step(run, tools)
        run.miner.after_step(ctx, state.step)
        state.step += 1
    if tools.sched is not None:
        tools.sched.step()
    loss_sum = all_reduce_sum(loss_sum, run.dctx) / run.dctx.world_size
    train_loss = float(loss_sum) / max(len(steps), 1)
    _check_finite("training loss", train_loss, state.epoch)
    return train_loss, n_skipped


def _step_loss(
    run: _Run,
    tools: _Round,
    state: TrainingState,
    group: list[list[Bag]],
    part: list[list[Bag]],
    feats: Iterator[torch.Tensor],
) -> torch.Tensor:
    """Forward and backward of this rank's share of one step; its detached loss."""
    # every rank's share is scaled so that the all-reduced mean of the gradients
    # is the gradient of the mean loss over the whole step
    scale = run.dctx.world_size / len(group)
    tools.opt.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=run.device)
    if run.batched and part:  # one padded forward; plain batches are 1 bag
        bags = [bag for batch in part for bag in batch]
        xs = [next(feats) for _ in bags]
        loss = _padded_loss(run.head, bags, xs, run.device, run.dtype, run.task)
        step_loss += _backward(tools.scaler, loss * len(part), scale)
    elif not run.batched:
        for batch in part:
            loss = _batch_loss(
                run.head,
                run.miner,
                tools.ctx,
                batch,
                feats,
                run.losses,
                run.device,
                run.dtype,
                state.step,
                run.task,
            )
            step_loss += _backward(tools.scaler, loss, scale)
    return step_loss


def _optimizer_step(run: _Run, tools: _Round) -> None:
    """Average the gradients over the processes, clip, step (scaled under fp16)."""
    all_reduce_gradients(tools.params, run.dctx)
    if run.cfg.grad_clip:
        tools.scaler.unscale_(tools.opt)
        torch.nn.utils.clip_grad_norm_(tools.params, run.cfg.grad_clip)
    tools.scaler.step(tools.opt)
    tools.scaler.update()


def _validate(run: _Run, epoch: int, row: dict[str, float]) -> tuple[float, ...]:
    """Validation loss and metrics into ``row``; the monitored score."""
    if not run.val_bags:
        return (float(epoch), 0.0)
    val_probs, val_loss, _ = predict(
        run.head,
        run.val_bags,
        run.device,
        amp=run.dtype,
        dist_ctx=run.dctx,
        prefetch=run.cfg.prefetch,
        task=run.task,
    )
    _check_finite("validation loss", val_loss, epoch)
    row["val_loss"] = val_loss
    row.update(run.task.val_row(run.val_bags, val_probs))
    return run.task.monitor_score(run.cfg.monitor, val_loss, val_probs, run.val_bags)


def _save(run: _Run, tools: _Round, state: TrainingState) -> None:
    """``last.pt``: the training state, modules, optimiser, schedule and RNGs."""
    if run.ckpt_path is None or not run.dctx.is_main:
        return
    device = run.device
    save_checkpoint(
        {
            **state.to_dict(),
            "head": run.head.state_dict(),
            "miner": run.miner.state_dict(),
            "optimizer": tools.opt.state_dict(),
            "scheduler": tools.sched.state_dict() if tools.sched is not None else None,
            "generator": run.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device)
            if device.type == "cuda"
            else None,
        },
        run.ckpt_path,
    )


def _end_round(run: _Run, tools: _Round, state: TrainingState) -> None:
    """Keep the round's best if it beats the rounds before; the miner's round end."""
    state.overall.keep_better(state.best, state.round, has_val=bool(run.val_bags))
    if state.round + 1 < run.cfg.rounds:
        ctx = tools.ctx
        run.head.load_state_dict(state.best.state)
        # The round's best validation score, for miners that accept its results
        # only when it improves (HNM's pseudo-labels); monitor None: no val bags.
        ctx.round_best_score = tuple(state.best.score)
        ctx.monitor = run.cfg.monitor if run.val_bags else None
        new_bags = run.miner.on_round_end(ctx, run.train_bags)
        for b in new_bags:
            b.origin = "generated"
        run.train_bags.extend(new_bags)
        state.added_bags.extend(new_bags)
    state.next_round()


def _result(run: _Run, state: TrainingState) -> FitResult:
    seconds = run.epoch_seconds
    return FitResult(
        best_state=state.overall.state,
        best_epoch=state.overall.epoch,
        history=state.history,
        train_bags=run.train_bags,
        seconds_per_epoch=float(np.median(seconds)) if seconds else math.nan,
        autocast_dtype=run.dtype,
        best_round=state.overall.round,
    )


def _autocast_dtype(
    head: MILHead, bags: list[Bag], device: torch.device, cfg: TrainConfig
) -> torch.dtype | None:
    """``train.amp`` on CUDA; ``train.cpu_precision`` (guarded on a bag) on CPU."""
    if device.type != "cpu":
        return amp_dtype(device, cfg.amp)
    key = "train.cpu_precision"
    return head_precision(head, bags, device, cfg.cpu_precision, key).dtype


def _nonfinite_step(loss_sum: torch.Tensor, dctx: DistContext) -> bool:
    """Whether this step's loss is NaN/inf on any rank (the same answer on all)."""
    bad = (~torch.isfinite(loss_sum)).float()
    return bool(all_reduce_sum(bad, dctx) > 0)


def _check_finite(what: str, value: float, epoch: int) -> None:
    """Stop training on a NaN/inf loss, before it is checkpointed or evaluated."""
    if not math.isfinite(value):
        msg = (
            f"epoch {epoch}: {what} is {value} (diverged: lower train.lr, set "
            "train.grad_clip, check the features for extreme values, or set "
            "train.nonfinite: skip to skip such steps)."
        )
        raise TrainingDivergedError(msg)


def _batch_loss(
    head: MILHead,
    miner: Miner,
    ctx: FitContext,
    batch: Sequence[Bag],
    feats: Iterator[torch.Tensor],
    losses: Sequence[tuple[BatchLoss, float]],
    device: torch.device,
    dtype: torch.dtype | None,
    step: int,
    task: Task,
) -> torch.Tensor:
    """Loss of one miner batch: mean bag loss (+ miner extras) plus the batch losses.

    The bag loss comes from ``task``; a task coupling the bags (Cox) adds its loss
    over the whole batch.
    """
    outs, labels, bag_losses = [], [], []
    with autocast(device, dtype):
        for bag in batch:
            x = next(feats)
            y = torch.tensor([bag.label], device=device)
            ctx.bag = bag
            out, extra = miner.forward(ctx, x, y, step)
            bag_loss = task.bag_loss(head, out, bag)
            for value in extra.values():
                bag_loss = bag_loss + value
            bag_losses.append(bag_loss)
            outs.append(out)
            labels.append(bag.label)
        loss = torch.stack(bag_losses).mean()
        coupled = task.batch_loss(head, outs, batch)
        if coupled is not None:
            loss = loss + coupled
        for loss_fn, weight in losses:
            value = loss_fn(head, outs, labels)
            if value is not None:
                loss = loss + weight * value
    return loss


def _can_pad(
    head: MILHead, miner: Miner, losses: Sequence[tuple[BatchLoss, float]]
) -> bool:
    """Whether a step's bags can go through ``head.forward_padded`` together."""
    return (
        head.supports_padding()
        and type(miner).forward is Miner.forward
        and type(miner).batches is Miner.batches
        and not losses
        and not head.needs_label_in_forward
    )


def _padded_loss(
    head: MILHead,
    bags: Sequence[Bag],
    xs: Sequence[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
    task: Task,
) -> torch.Tensor:
    """Task loss of ``bags`` from one padded ``[B, N_max, D]`` forward."""
    lengths = torch.tensor([x.shape[0] for x in xs], device=device)
    x = torch.nn.utils.rnn.pad_sequence(list(xs), batch_first=True)
    mask = torch.arange(x.shape[1], device=device)[None, :] < lengths[:, None]
    with autocast(device, dtype):
        logits = head.forward_padded(x, mask)
    return task.criterion(logits.float(), bags)


def _backward(
    scaler: torch.amp.GradScaler, loss: torch.Tensor, scale: float
) -> torch.Tensor:
    """Backward of ``scale * loss`` (gradients accumulate); returns it detached."""
    if scale != 1.0:
        loss = loss * scale
    scaler.scale(loss).backward()
    return loss.detach().float()


class _LoopSubTraining(SubTraining):
    """:class:`~tiahnm.miners.base.SubTraining` under a run's runtime.

    Inner fits are :func:`fit` calls on the run's device, precision settings and
    processes, checkpointed in ``<checkpoint dir>/sub/r<round>_<key>/`` (a resumed
    run repeats a miner's round end and its inner fits resume there); inner steps
    use the run's autocast dtype, an fp16 gradient scaler, and average their
    gradients over the processes.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        cfg: TrainConfig | None = None,
        dtype: torch.dtype | None = None,
        dist_ctx: DistContext = SINGLE,
        checkpoint_dir: Path | None = None,
        round_idx: int = 0,
    ) -> None:
        self.device, self.cfg, self.dtype = device, cfg, dtype
        self.dist_ctx, self.round = dist_ctx, round_idx
        self.checkpoint_dir = checkpoint_dir
        # one scaler serves every optimiser a miner steps (GradScaler keeps
        # per-optimiser state itself)
        self._scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

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
        """See :meth:`tiahnm.miners.base.SubTraining.fit`."""
        from tiahnm.config import TrainConfig

        runtime = {k: getattr(self.cfg, k) for k in _RUNTIME_KEYS} if self.cfg else {}
        cfg = TrainConfig(
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            patience=epochs if patience is None else patience,
            progress=False,
            **runtime,
        )
        folder = None
        if self.checkpoint_dir is not None:
            folder = self.checkpoint_dir / "sub" / f"r{self.round}_{key}"
        devices = []
        if self.device.type == "cuda":
            index = self.device.index
            devices = [torch.cuda.current_device() if index is None else index]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            res = fit(
                head,
                train_bags,
                val_bags,
                cfg,
                device=self.device,
                seed=seed,
                checkpoint_dir=folder,
                dist_ctx=self.dist_ctx,
            )
        return SubFitResult(res.best_state, res.best_epoch, res.history)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The run's autocast (a no-op in full precision)."""
        return autocast(self.device, self.dtype)

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        loss: torch.Tensor,
    ) -> float:
        """Backward (scaled under fp16), gradients averaged over processes, step."""
        scaler = self._scaler
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        all_reduce_gradients(list(params), self.dist_ctx)
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())


#: Settings an inner fit takes from the outer run (how it runs, not what it learns).
_RUNTIME_KEYS = (
    "amp",
    "cpu_precision",
    "nonfinite",
    "prefetch",
    "loader_workers",
    "pin_memory",
    "checkpoint_every",
)


def sub_training(
    device: torch.device, cfg: TrainConfig | None = None, **kwargs: Any
) -> SubTraining:
    """The :class:`~tiahnm.miners.base.SubTraining` :func:`fit` gives its miner.

    For a :class:`~tiahnm.miners.base.FitContext` built outside the loop (tests,
    notebooks). ``kwargs``: ``dtype``, ``dist_ctx``, ``checkpoint_dir``, ``round_idx``.
    """
    return _LoopSubTraining(device, cfg=cfg, **kwargs)


__all__ = [
    "FitResult",
    "compile_head",
    "fit",
    "group_steps",
    "make_optimizer",
    "make_scheduler",
    "predict",
    "sub_training",
]
