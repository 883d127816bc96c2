"""The CPU precision of a head: its guard probe (:mod:`tiahnm.runtime.precision`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tiahnm.runtime.precision import Outputs, Precision, resolve

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.data.bag import Bag
    from tiahnm.heads.base import MILHead


def head_probe(
    head: MILHead, bag: Bag, device: torch.device
) -> Callable[[torch.dtype | None], Outputs]:
    """A probe: ``head``'s instance and bag embeddings of ``bag`` (eval mode)."""

    def probe(dtype: torch.dtype | None) -> Outputs:
        was_training = head.training
        head.eval()
        try:
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None),
            ):
                x = bag.features.to(device)
                out = head(x)
                return (
                    out.instance_embeddings.float(),
                    out.bag_embedding.float().reshape(1, -1),
                    out.bag_logits.float().reshape(1, -1),
                )
        finally:
            head.train(was_training)

    return probe


def head_precision(
    head: MILHead, bags: list[Bag], device: torch.device, value: str, key: str
) -> Precision:
    """``value`` resolved for training/predicting ``head``; ``auto`` probes ``bags[0]``."""
    probe = head_probe(head, bags[0], device) if bags else None
    return resolve(value, device, key, probe)


__all__ = ["head_precision", "head_probe"]
