"""Hard-instance miners. A miner customises the shared loop through a few hooks."""

from tiahnm.utils.lazy import lazy_exports

__all__ = ["FitContext", "Miner"]
__getattr__ = lazy_exports(__name__, "tiahnm.miners.base", __all__)
