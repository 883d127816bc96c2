"""tiahnm: hard-instance mining for weakly supervised whole-slide-image MIL.

The public Python API is re-exported here lazily, so ``import tiahnm`` (and
``tiahnm --help``) does not import torch or TIAToolbox.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Bag": "tiahnm.data.bag",
    "BagSource": "tiahnm.data.bag",
    "MILHead": "tiahnm.heads.base",
    "MILOutput": "tiahnm.heads.base",
    "Miner": "tiahnm.miners.base",
    "BatchLoss": "tiahnm.losses.base",
    "Config": "tiahnm.config",
    "load_config": "tiahnm.config",
    "run_training": "tiahnm.crossval",
    "get_registry": "tiahnm.plugins",
    "get_plugin_manager": "tiahnm.plugins",
    "hookimpl": "tiahnm.hookspecs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'tiahnm' has no attribute {name!r}"
    raise AttributeError(msg)
