"""tiahnm-topk-miner: an example third-party tiahnm plugin.

It provides the ``topk`` miner (:class:`~tiahnm_topk_miner.miner.TopKMiner`), the
``topk_mean`` head (:class:`~tiahnm_topk_miner.head.TopKMeanMIL`) and the ``jsonl_log``
callback (:class:`~tiahnm_topk_miner.callback.JSONLinesLog`), registered through
the ``tiahnm`` entry point ``topk_miner = "tiahnm_topk_miner.plugin"``.

The classes are imported on first access, so that loading the plugin module does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "JSONLinesLog": "tiahnm_topk_miner.callback",
    "TopKMiner": "tiahnm_topk_miner.miner",
    "TopKMeanMIL": "tiahnm_topk_miner.head",
}

__all__ = ["JSONLinesLog", "TopKMeanMIL", "TopKMiner", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'tiahnm_topk_miner' has no attribute {name!r}"
    raise AttributeError(msg)
