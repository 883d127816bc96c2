"""Checkpoints: atomic ``torch.save`` and safe ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tiahnm.errors import DataError, ResourceError
from tiahnm.utils.io import atomic_path


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Save ``obj`` (tensors and plain values only) atomically."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except RuntimeError as exc:  # torch's writer reports a failed write this way
        msg = (
            f"{path}: cannot write the checkpoint (disk full or not writable?) "
            f"({str(exc).splitlines()[0]})."
        )
        raise ResourceError(msg) from None


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: checkpoint not found."
        raise DataError(msg)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        msg = f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})."
        raise DataError(msg) from None
    if not isinstance(obj, dict):
        msg = f"{path}: checkpoint is a {type(obj).__name__}, expected a dict."
        raise DataError(msg)
    return obj


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s state dict (kept while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
