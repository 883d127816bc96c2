"""Data-parallel training and sharded extraction with ``torch.distributed``.

Started by ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N ...``),
every process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment;
:func:`init_distributed` joins the process group (NCCL on CUDA, gloo on CPU). Without
those variables (or with ``WORLD_SIZE=1``) everything here is a no-op and the code
runs as one process.

Training is data parallel over bags: every rank builds the same step list (the
shuffle generator is seeded alike), takes its share of each step's bags, and the
gradients of the head and of the miner's trainable modules are averaged with one
all-reduce per step (:func:`all_reduce_gradients`; what DDP does, but it also covers
miner modules that DDP would not wrap, such as MHIM's recycle network). Initial
parameters are broadcast from rank 0, so every rank applies the same update and the
models stay identical.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tiahnm.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job.

    Attributes:
        rank (int): Global rank (0 is the main process).
        world_size (int): Number of processes.
        local_rank (int): Rank on this machine (its GPU index).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files)."""
        return self.rank == 0


SINGLE = DistContext()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        msg = (
            f"environment variable {name}={raw!r} is not an integer (set by torchrun)."
        )
        raise ConfigError(msg) from None


def env_context() -> DistContext:
    """The context the ``torchrun`` environment variables describe."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        msg = f"RANK={rank} and WORLD_SIZE={world} are inconsistent (0 <= RANK < WORLD_SIZE)."
        raise ConfigError(msg)
    return DistContext(rank=rank, world_size=world, local_rank=local)


def current() -> DistContext:
    """The context of the joined process group, or :data:`SINGLE` when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    world = dist.get_world_size()
    rank = dist.get_rank()
    return DistContext(rank, world, _env_int("LOCAL_RANK", rank))


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by the environment (once); return the context.

    Args:
        device (str): The configured device (``auto``, ``cpu``, ``cuda`` ...): NCCL is
            used when it is a CUDA device (or ``auto`` with CUDA present), else gloo.

    Returns:
        DistContext: :data:`SINGLE` outside ``torchrun``.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    ctx = env_context()
    if not ctx.enabled:
        return SINGLE
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current()


def local_device(device: torch.device, ctx: DistContext) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA device under ``torchrun``; ``device`` otherwise."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """Items ``rank, rank + world_size, ...`` (round robin; all of them when single)."""
    return list(items[ctx.rank :: ctx.world_size])


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op when single)."""
    if ctx.enabled:
        dist.barrier()


def broadcast_modules(modules: Iterable[torch.nn.Module], ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)


def all_reduce_gradients(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Average the gradients of ``params`` over ranks with one flat all-reduce.

    A parameter without a gradient on some rank counts as zero there; it keeps
    ``grad=None`` only when no rank has a gradient for it (so optimisers skip it,
    exactly as in a single process).
    """
    if not ctx.enabled or not params:
        return
    ref = params[0]
    chunks, flags = [], []
    for p in params:
        if p.grad is None:
            chunks.append(
                torch.zeros(p.numel(), device=ref.device, dtype=torch.float32)
            )
            flags.append(0.0)
        else:
            chunks.append(p.grad.detach().reshape(-1).float())
            flags.append(1.0)
    chunks.append(torch.tensor(flags, device=ref.device))
    flat = torch.cat(chunks)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat[: -len(params)] /= ctx.world_size
    offset = 0
    has_grad = flat[-len(params) :].tolist()
    for p, flag in zip(params, has_grad, strict=True):
        n = p.numel()
        if flag > 0:
            grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
        offset += n


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``value`` over ranks (``value`` itself when single)."""
    if not ctx.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` when single)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def unshard(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """Inverse of :func:`shard`: merge per-rank lists back into the original order."""
    world = len(parts)
    out: list[Any] = [None] * n
    for rank, part in enumerate(parts):
        for j, item in enumerate(part):
            out[rank + j * world] = item
    return out


__all__ = [
    "SINGLE",
    "DistContext",
    "all_gather_objects",
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_modules",
    "current",
    "env_context",
    "init_distributed",
    "local_device",
    "shard",
    "unshard",
]
