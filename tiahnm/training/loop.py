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

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tiahnm.errors import ConfigError, DataError, TrainingDivergedError
from tiahnm.miners.base import FitContext, Miner
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
            resumed (by every rank).
        on_epoch_end (Callable | None): Called with each epoch's history row.
        dist_ctx (DistContext | None): Multi-process context (default: the joined
            process group, if any).
        task (Task | None): Loss, outputs and monitor (default: binary or
            multiclass by ``head.n_classes``); fitted on ``train_bags`` here.

    Returns:
        FitResult: Best state dict, its epoch and the history (the same on every rank).
    """
    _check_cfg(cfg)
    dctx = dist_ctx if dist_ctx is not None else current()
    miner = miner or Miner()
    task = task or _default_task(head)
    task.fit(train_bags)
    device = device or torch.device("cpu")
    head.to(device)
    train_bags = list(train_bags)
    dtype = _autocast_dtype(head, train_bags, device, cfg)
    if cfg.pin_memory:
        train_bags = pin_bags(train_bags, device)
    generator = torch.Generator().manual_seed(seed)
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    batched = _can_pad(head, miner, losses) if cfg.pad_batches else False

    round_idx, start_epoch = 0, 0
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {
        "score": (-math.inf, -math.inf),
        "epoch": -1,
        "state": None,
        "bad": 0,
    }
    # The best over every round (validation only): a later round is kept only when
    # its best validation score beats the earlier rounds' (none: the last round).
    overall: dict[str, Any] = {"score": None, "epoch": -1, "state": None, "round": 0}
    resume = (
        load_checkpoint(ckpt_path)
        if ckpt_path is not None and ckpt_path.is_file()
        else None
    )
    if resume is not None:
        round_idx = int(resume["round"])
        for item in resume.get("added_bags", []):
            train_bags.append(_bag_from_dict(item))

    epoch_seconds: list[float] = []
    compiled = False
    while round_idx < cfg.rounds:
        n_miner_batches = max(1, miner.n_steps(len(train_bags)))
        ctx = FitContext(
            head=head,
            device=device,
            epochs=cfg.epochs,
            steps_per_epoch=-(-n_miner_batches // cfg.batch_size),
            round=round_idx,
            generator=generator,
        )
        # Before the optimiser exists, so a miner can build trainable modules here.
        miner.on_fit_start(ctx)
        if cfg.compile and not compiled:
            # after on_fit_start: a miner's copy of the head (MHIM teacher) stays eager
            compile_head(head)
            compiled = True
        params = list(head.parameters())
        for module in miner.modules().values():
            module.to(device)
            params += [p for p in module.parameters() if p.requires_grad]
        params = [p for p in params if p.requires_grad]
        broadcast_modules([head, *miner.modules().values()], dctx)
        opt = make_optimizer(params, cfg)
        sched = make_scheduler(opt, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        if resume is not None:
            try:
                head.load_state_dict(resume["head"])
                miner.load_state_dict(resume["miner"])
                opt.load_state_dict(resume["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                msg = (
                    f"{ckpt_path}: this checkpoint was made by a run with other "
                    f"settings and cannot be resumed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0]}); delete it or use another output "
                    "folder."
                )
                raise DataError(msg) from None
            if sched is not None and resume.get("scheduler") is not None:
                sched.load_state_dict(resume["scheduler"])
            generator.set_state(resume["generator"])
            torch.set_rng_state(resume["torch_rng"])
            if device.type == "cuda" and resume.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(resume["cuda_rng"], device)
            history = list(resume["history"])
            best = {
                "score": tuple(resume["best_score"]),
                "epoch": int(resume["best_epoch"]),
                "state": resume["best_state"],
                "bad": int(resume["bad_epochs"]),
            }
            start_epoch = int(resume["epoch"]) + 1
            if resume.get("overall_best") is not None:
                overall = dict(resume["overall_best"])
            stopped = bool(resume.get("stopped", False))
            resume = None
            if stopped:
                start_epoch = cfg.epochs
        step = start_epoch * ctx.steps_per_epoch
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            head.train()
            miner.on_epoch_start(ctx, epoch)
            steps = group_steps(
                list(miner.batches(ctx, train_bags, generator)), cfg.batch_size
            )
            if task.couples_bags:  # one loss over the bags of a step (Cox)
                steps = [[[b for batch in g for b in batch]] for g in steps]
            mine = [shard(group, dctx) for group in steps]
            feats = iter_features(
                [bag for part in mine for batch in part for bag in batch],
                device,
                prefetch=cfg.prefetch,
                workers=cfg.loader_workers,
            )
            loss_sum = torch.zeros((), device=device)
            n_skipped = 0
            for group, part in zip(steps, mine, strict=True):
                step_start = loss_sum.clone() if cfg.nonfinite == "skip" else None
                # every rank's share is scaled so that the all-reduced mean of the
                # gradients is the gradient of the mean loss over the whole step
                scale = dctx.world_size / len(group)
                opt.zero_grad(set_to_none=True)
                if batched and part:  # one padded forward; plain batches are 1 bag
                    bags = [bag for batch in part for bag in batch]
                    xs = [next(feats) for _ in bags]
                    loss = _padded_loss(head, bags, xs, device, dtype, task) * len(part)
                    loss_sum += _backward(scaler, loss, scale)
                elif not batched:
                    for batch in part:
                        loss = _batch_loss(
                            head,
                            miner,
                            ctx,
                            batch,
                            feats,
                            losses,
                            device,
                            dtype,
                            step,
                            task,
                        )
                        loss_sum += _backward(scaler, loss, scale)
                if step_start is not None and _nonfinite_step(loss_sum, dctx):
                    loss_sum = step_start  # skip this step (counted), keep going
                    opt.zero_grad(set_to_none=True)
                    n_skipped += 1
                    step += 1
                    continue
                all_reduce_gradients(params, dctx)
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                miner.after_step(ctx, step)
                step += 1
            if sched is not None:
                sched.step()
            loss_sum = all_reduce_sum(loss_sum, dctx) / dctx.world_size
            train_loss = float(loss_sum) / max(len(steps), 1)
            _check_finite("training loss", train_loss, epoch)
            epoch_seconds.append(time.perf_counter() - t0)
            row: dict[str, float] = {
                "round": round_idx,
                "epoch": epoch,
                "train_loss": train_loss,
                **miner.epoch_stats(),
            }
            if cfg.nonfinite == "skip":
                row["nonfinite_steps"] = n_skipped
            if val_bags:
                val_probs, val_loss, _ = predict(
                    head,
                    val_bags,
                    device,
                    amp=dtype,
                    dist_ctx=dctx,
                    prefetch=cfg.prefetch,
                    task=task,
                )
                _check_finite("validation loss", val_loss, epoch)
                score = task.monitor_score(cfg.monitor, val_loss, val_probs, val_bags)
                row["val_loss"] = val_loss
                row.update(task.val_row(val_bags, val_probs))
            else:
                score = (float(epoch), 0.0)
            if score > best["score"]:
                best = {
                    "score": score,
                    "epoch": epoch,
                    "state": _cpu_state(head),
                    "bad": 0,
                }
            else:
                best["bad"] += 1
            history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(row)
            stop = (
                bool(val_bags)
                and best["bad"] >= cfg.patience
                and epoch + 1 >= cfg.min_epochs
            )
            last_epoch = stop or epoch + 1 == cfg.epochs
            if (
                ckpt_path is not None
                and dctx.is_main
                and ((epoch + 1) % cfg.checkpoint_every == 0 or last_epoch)
            ):
                save_checkpoint(
                    {
                        "round": round_idx,
                        "epoch": epoch,
                        "stopped": stop,
                        "head": head.state_dict(),
                        "miner": miner.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None,
                        "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device)
                        if device.type == "cuda"
                        else None,
                        "history": history,
                        "best_score": list(best["score"]),
                        "best_epoch": best["epoch"],
                        "best_state": best["state"],
                        "bad_epochs": best["bad"],
                        "overall_best": overall,
                        "added_bags": [
                            _bag_to_dict(b)
                            for b in train_bags
                            if b.origin == "generated"
                        ],
                    },
                    ckpt_path,
                )
            if stop:
                break
        start_epoch = 0
        overall = _keep_better(overall, best, round_idx, has_val=bool(val_bags))
        round_idx += 1
        if round_idx < cfg.rounds:
            head.load_state_dict(best["state"])
            # The round's best validation score, for miners that accept its results
            # only when it improves (HNM's pseudo-labels); monitor None: no val bags.
            ctx.state["best_score"] = tuple(best["score"])
            ctx.state["monitor"] = cfg.monitor if val_bags else None
            new_bags = miner.on_round_end(ctx, train_bags)
            for b in new_bags:
                b.origin = "generated"
            train_bags.extend(new_bags)
            best = {
                "score": (-math.inf, -math.inf),
                "epoch": -1,
                "state": None,
                "bad": 0,
            }
    return FitResult(
        best_state=overall["state"],
        best_epoch=overall["epoch"],
        history=history,
        train_bags=train_bags,
        seconds_per_epoch=float(np.median(epoch_seconds))
        if epoch_seconds
        else math.nan,
        autocast_dtype=dtype,
        best_round=overall["round"],
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


def _keep_better(
    overall: dict[str, Any], best: dict[str, Any], round_idx: int, *, has_val: bool
) -> dict[str, Any]:
    """The better of the rounds so far and this round's best (validation score).

    Without validation bags the latest round wins; on a tie the earlier round stays.
    """
    if (
        overall["score"] is None
        or not has_val
        or best["score"] > tuple(overall["score"])
    ):
        return {
            "score": list(best["score"]),
            "epoch": best["epoch"],
            "state": best["state"],
            "round": round_idx,
        }
    return overall


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


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


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


__all__ = [
    "FitResult",
    "compile_head",
    "fit",
    "group_steps",
    "make_optimizer",
    "make_scheduler",
    "predict",
]
