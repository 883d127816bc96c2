"""Built-in MIL heads, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_heads(register: Register) -> None:
    """Register the built-in heads."""
    from tiahnm.heads.abmil import ABMIL, GatedABMIL
    from tiahnm.heads.dsmil import DSMIL
    from tiahnm.heads.pooling import MaxPoolingMIL, MeanPoolingMIL

    register("abmil", ABMIL, description="Attention MIL (Ilse et al. 2018)")
    register("abmil_gated", GatedABMIL, description="Gated attention MIL (Ilse et al. 2018)")
    register("dsmil", DSMIL, description="Dual-stream MIL (Li et al. 2021)")
    register("mean_pool", MeanPoolingMIL, description="Mean of instance logits")
    register("max_pool", MaxPoolingMIL, description="Max of instance logits")
