"""Device and mixed-precision (autocast) selection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tiahnm.errors import ConfigError


def resolve_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """``auto`` gives CUDA when available, else CPU; other names are checked.

    Args:
        name (str): ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        key (str): The setting's name in messages (``train.device``, ``--device``).

    Raises:
        ConfigError: Not a device name, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        msg = f"{key}: {name!r} is not a device name (auto, cpu, cuda, cuda:0 ...)."
        raise ConfigError(msg) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = f"{key} is {name!r} but CUDA is not available here; use auto or cpu."
        raise ConfigError(msg)
    return device


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device`` (None means full precision)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast when ``dtype`` is set (GPU, or bf16 on CPU), a no-op otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
