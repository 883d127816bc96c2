"""Lazy re-exports, so that importing a sub-package does not import torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any


def lazy_exports(
    package: str, module: str, names: Iterable[str]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names`` from ``module`` on first use."""
    exported = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name in exported:
            return getattr(importlib.import_module(module), name)
        msg = f"module {package!r} has no attribute {name!r}"
        raise AttributeError(msg)

    return __getattr__
