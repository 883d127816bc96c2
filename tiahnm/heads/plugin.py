"""Built-in MIL heads, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_heads(register: Register) -> None:
    """Register the built-in heads."""
    from tiahnm.heads.abmil import ABMIL, ABMILOptions, GatedABMIL, GatedABMILOptions
    from tiahnm.heads.clam import CLAMMB, CLAMSB, CLAMOptions
    from tiahnm.heads.dsmil import DSMIL, DSMILOptions
    from tiahnm.heads.dtfd import DTFD, DTFDOptions
    from tiahnm.heads.end_to_end import EncoderMIL
    from tiahnm.heads.options import HeadOptions
    from tiahnm.heads.pooling import MaxPoolingMIL, MeanPoolingMIL
    from tiahnm.heads.transmil import TransMIL, TransMILOptions

    register(
        "abmil",
        ABMIL,
        options=ABMILOptions,
        description="Attention MIL (Ilse et al. 2018)",
    )
    register(
        "abmil_gated",
        GatedABMIL,
        options=GatedABMILOptions,
        description="Gated attention MIL (Ilse et al. 2018)",
    )
    register(
        "dsmil",
        DSMIL,
        options=DSMILOptions,
        description="Dual-stream MIL (Li et al. 2021)",
    )
    register(
        "mean_pool",
        MeanPoolingMIL,
        options=HeadOptions,
        description="Mean of instance logits",
    )
    register(
        "max_pool",
        MaxPoolingMIL,
        options=HeadOptions,
        description="Max of instance logits",
    )
    register(
        "transmil",
        TransMIL,
        options=TransMILOptions,
        description="Nystrom Transformer MIL (Shao et al. 2021)",
    )
    register(
        "clam_sb",
        CLAMSB,
        options=CLAMOptions,
        description="CLAM single-branch (Lu et al. 2021)",
    )
    register(
        "clam_mb",
        CLAMMB,
        options=CLAMOptions,
        description="CLAM multi-branch (Lu et al. 2021)",
    )
    register(
        "dtfd",
        DTFD,
        options=DTFDOptions,
        description="Double-tier feature distillation MIL (Zhang 2022)",
    )
    register(
        "encoder_mil",
        EncoderMIL,
        description="Patch encoder + MIL head trained end to end on image bags",
    )
