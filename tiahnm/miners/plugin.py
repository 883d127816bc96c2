"""Built-in miners, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_miners(register: Register) -> None:
    """Register the built-in miners."""
    from tiahnm.miners.base import Miner

    register("none", Miner, description="No mining: plain training of the head")
