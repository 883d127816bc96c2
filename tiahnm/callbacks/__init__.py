"""Callbacks: loggers and other observers of a run's events (pluggy ``callback`` kind)."""

from tiahnm.utils.lazy import lazy_exports

__all__ = [
    "Callback",
    "CallbackError",
    "CallbackRunner",
    "RunInfo",
    "build_callbacks",
]
__getattr__ = lazy_exports(__name__, "tiahnm.callbacks.base", __all__)
