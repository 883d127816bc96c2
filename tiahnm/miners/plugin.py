"""Built-in miners, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_miners(register: Register) -> None:
    """Register the built-in miners."""
    from tiahnm.miners.base import Miner
    from tiahnm.miners.hnm import HNMMiner, HNMOptions
    from tiahnm.miners.li2019 import Li2019Miner, Li2019Options
    from tiahnm.miners.mhim import MHIMMiner, MHIMOptions

    register("none", Miner, description="No mining: plain training of the head")
    register(
        "mhim",
        MHIMMiner,
        options=MHIMOptions,
        description="Masked hard instance mining, EMA teacher (Tang et al. 2023/2025)",
    )
    register(
        "li2019",
        Li2019Miner,
        options=Li2019Options,
        description="Hard negative bag generation between rounds (Li et al. 2019)",
    )
    register(
        "hnm",
        HNMMiner,
        options=HNMOptions,
        description="Hard-negative SupCon encoder fine-tuning between MIL rounds "
        "(HNM-WSI / ItS2CLR)",
    )
