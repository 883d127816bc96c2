"""Feeding bag features to the device: pinned caching and background prefetch.

* :func:`pin_bags`: on CUDA, training bags held in memory are copied once into
  page-locked (pinned) memory when they fit in a share of the free RAM, so every
  host-to-device copy is asynchronous (``non_blocking=True``).
* :func:`iter_features`: yields each bag's features in order; bags streamed from disk
  (``bag.meta["storage"] == "mmap"``, see :mod:`tiahnm.data.h5_features`) and, on
  CUDA, bags not pinned yet are read / pinned by ``workers`` background threads,
  ``prefetch`` bags ahead of the one being trained on. In-memory bags on CPU are
  passed through untouched (no copy, no thread), so the per-step cost does not grow
  with the bag size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.data.bag import Bag

#: Bags cached in pinned memory may take at most this share of the available RAM.
PIN_BUDGET = 0.5


def available_ram() -> int:
    """Available physical memory in bytes (0 when the OS does not say)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def is_streamed(bag: Bag) -> bool:
    """True for bags whose features are memory-mapped from their file."""
    return bag.meta.get("storage") == "mmap"


def pin_bags(
    bags: Sequence[Bag], device: torch.device, *, budget: float = PIN_BUDGET
) -> list[Bag]:
    """Copies of ``bags`` with pinned features, on CUDA and when they fit in RAM.

    Streamed bags are left as they are (they are pinned one at a time while
    prefetched). Returns ``bags`` unchanged on CPU or when the in-memory features
    take more than ``budget`` of the available RAM.
    """
    if device.type != "cuda":
        return list(bags)
    todo = [b for b in bags if not is_streamed(b) and not b.features.is_pinned()]
    need = sum(b.features.numel() * b.features.element_size() for b in todo)
    if not todo or need > budget * available_ram():
        return list(bags)
    return [
        replace(b, features=b.features.pin_memory())
        if not is_streamed(b) and not b.features.is_pinned()
        else b
        for b in bags
    ]


def _load(bag: Bag, *, pin: bool) -> torch.Tensor:
    x = bag.features
    if is_streamed(bag):
        x = x.clone()  # reads the mapped pages into (pinned, on CUDA) memory
        return x.pin_memory() if pin else x
    if pin and not x.is_pinned():
        return x.pin_memory()
    return x


def iter_features(
    bags: Sequence[Bag],
    device: torch.device,
    *,
    prefetch: int = 2,
    workers: int = 1,
) -> Iterator[torch.Tensor]:
    """Features of ``bags`` on ``device``, in order, read ahead in threads.

    Args:
        bags (Sequence[Bag]): The bags, in the order they are used.
        device (torch.device): Target device (copies are ``non_blocking``).
        prefetch (int): Bags loaded ahead (0: load each one when it is needed).
        workers (int): Reading threads.

    Yields:
        torch.Tensor: ``[N, D]`` features on ``device``.
    """
    pin = device.type == "cuda"
    background = prefetch > 0 and (pin or any(is_streamed(b) for b in bags))
    if not background:
        for bag in bags:
            yield _load(bag, pin=pin).to(device, non_blocking=True)
        return
    pending: deque[Future[torch.Tensor]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = iter(bags)
        try:
            for bag in it:
                pending.append(pool.submit(_load, bag, pin=pin))
                if len(pending) > prefetch:
                    yield pending.popleft().result().to(device, non_blocking=True)
            while pending:
                yield pending.popleft().result().to(device, non_blocking=True)
        finally:
            for fut in pending:
                fut.cancel()


__all__ = ["available_ram", "is_streamed", "iter_features", "pin_bags"]
