"""A torch ``Dataset`` of one slide's patches, read through TIAToolbox.

Each item is a ``[H, W, 3]`` uint8 tensor: conversion to float, resizing and
normalisation happen batched on the device (:class:`tiahnm.encoders.base.Preprocessing`),
so workers only read and decode. Every worker opens its own reader on first use.
Without workers, :func:`threaded_batches` reads ahead in a background thread.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tiahnm.slides.reader import SlideSource


def as_rgb_uint8(patch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``patch`` as contiguous ``[h, w, 3]`` uint8 of ``size`` (w, h), padded white."""
    arr = np.asarray(patch)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    w, h = size
    if arr.shape[:2] != (h, w):  # guard against off-by-one reads at odd scales
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        hh, ww = min(h, arr.shape[0]), min(w, arr.shape[1])
        out[:hh, :ww] = arr[:hh, :ww]
        arr = out
    return np.ascontiguousarray(arr)


class SlidePatchDataset(Dataset):
    """Patches of one slide at a target resolution.

    Args:
        source (SlideSource): How to open the slide.
        bounds (np.ndarray): ``[N, 4]`` patch bounds at the target resolution.
        resolution (float): Target resolution.
        units (str): Its units (``mpp``, ``power``, ``baseline``).
        reader (Any): An open reader to reuse in this process (only used with
            ``num_workers=0``; workers open their own).
    """

    def __init__(
        self,
        source: SlideSource,
        bounds: np.ndarray,
        resolution: float,
        units: str,
        *,
        reader: Any = None,
    ) -> None:
        self.source = source
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.resolution = resolution
        self.units = units
        self._reader = reader
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.bounds.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # readers hold file handles: reopen in each process
        return state

    def read(self, index: int) -> np.ndarray:
        """Patch ``index`` as ``[h, w, 3]`` uint8 (what TIAToolbox's WSIPatchDataset reads)."""
        if self._reader is None or self._pid != os.getpid():
            # a reader inherited through fork shares file handles: open our own
            self._reader, self._pid = self.source.open(), os.getpid()
        b = self.bounds[index]
        patch = self._reader.read_bounds(
            b,
            resolution=self.resolution,
            units=self.units,
            pad_constant_values=255,
            coord_space="resolution",
        )
        return as_rgb_uint8(patch, (int(b[2] - b[0]), int(b[3] - b[1])))

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.read(index))


def threaded_batches(
    dataset: SlidePatchDataset,
    batch_size: int,
    *,
    prefetch: int = 2,
    pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """Batches ``[B, H, W, 3]`` uint8 read by one background thread, in order.

    Reading (OpenSlide/tifffile decoding, resizing) releases the GIL, so it overlaps
    with the forward passes of the caller without worker processes: this is how
    slides are read when no DataLoader workers are used. The patches are exactly those
    of ``dataset[i]``.

    Args:
        dataset (SlidePatchDataset): The patches (its reader is used by the thread only).
        batch_size (int): Patches per batch.
        prefetch (int): Batches read ahead.
        pin_memory (bool): Pin batches (for asynchronous copies to CUDA).

    Yields:
        torch.Tensor: The next batch.
    """
    n = len(dataset)
    starts = list(range(0, n, batch_size))

    def load(start: int) -> torch.Tensor:
        batch = torch.stack(
            [dataset[i] for i in range(start, min(start + batch_size, n))]
        )
        return batch.pin_memory() if pin_memory else batch

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiahnm-read")
    try:
        pending = deque(pool.submit(load, s) for s in starts[:prefetch])
        following = iter(starts[prefetch:])
        while pending:
            batch = pending.popleft().result()
            nxt = next(following, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
