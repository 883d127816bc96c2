"""Built-in losses, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_losses(register: Register) -> None:
    """Register the built-in losses."""
    from tiahnm.losses.ranking import MIRankLoss, MIRankOptions
    from tiahnm.losses.supcon import SupConLoss, SupConOptions

    register(
        "mirank",
        MIRankLoss,
        options=MIRankOptions,
        description="MI ranking loss max(0, m - mean topK pos + mean topK neg) (HNM-WSI)",
    )
    register(
        "supcon",
        SupConLoss,
        options=SupConOptions,
        description="Supervised contrastive loss, T=0.07, pair modes all/neg/pos "
        "(ItS2CLR / HNM-WSI)",
    )
