"""Peak memory of a block of code, for the benchmarks.

CPU: Linux's ``VmHWM`` (peak resident set) is reset by writing ``5`` to
``/proc/self/clear_refs``; the peak after the block minus the resident set before it
is the block's peak growth. ``resource.getrusage(...).ru_maxrss`` cannot be reset, so
when data creation or imports already pushed the high-water mark above the block's
need it reads 0; it is only the fallback where ``clear_refs`` is not writable.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import gc
import resource
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class Peak:
    """Context manager; ``mb`` is the peak memory growth inside the block (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = float("nan")
        self.method = ""

    def __enter__(self) -> Peak:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
        elif _reset_hwm() and _status_kb("VmHWM") is not None:
            self._base = _status_kb("VmRSS") or 0
            self.method = "VmHWM-after-clear_refs"
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(self.device)
            self.mb = (peak - self._base) / 2**20
        elif self.method.startswith("VmHWM"):
            self.mb = ((_status_kb("VmHWM") or 0) - self._base) / 1024
        else:
            self.mb = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base
            ) / 1024
