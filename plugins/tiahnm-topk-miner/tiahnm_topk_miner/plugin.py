"""The hook implementations tiahnm loads through the ``tiahnm`` entry point.

Only ``tiahnm.hookspecs`` (pluggy, no torch) is imported here; the component classes
are imported inside the hooks, which tiahnm calls when it first needs a registry.
"""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_miners(register: Register) -> None:
    """Register the ``topk`` miner.

    Args:
        register (Register): tiahnm's registration callback.
    """
    from tiahnm_topk_miner.miner import TopKMiner

    register(
        "topk",
        TopKMiner,
        description="Masks the top-scored instances of each bag (MHIM, no teacher)",
    )


@hookimpl
def tiahnm_register_heads(register: Register) -> None:
    """Register the ``topk_mean`` head.

    Args:
        register (Register): tiahnm's registration callback.
    """
    from tiahnm_topk_miner.head import TopKMeanMIL

    register(
        "topk_mean",
        TopKMeanMIL,
        description="Mean of the top-k instance logits per class",
    )


@hookimpl
def tiahnm_register_callbacks(register: Register) -> None:
    """Register the ``jsonl_log`` callback.

    Args:
        register (Register): tiahnm's registration callback.
    """
    from tiahnm_topk_miner.callback import JSONLinesLog

    register(
        "jsonl_log",
        JSONLinesLog,
        description="Every epoch row of every fold as a JSON line",
    )
