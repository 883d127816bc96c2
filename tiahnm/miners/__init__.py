"""Hard-instance miners. A miner customises the shared loop through a few hooks."""

from tiahnm.miners.base import FitContext, Miner

__all__ = ["FitContext", "Miner"]
