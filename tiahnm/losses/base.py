"""The :class:`BatchLoss` interface for loss plugins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.heads.base import MILHead, MILOutput


class BatchLoss:
    """A loss over the head outputs of one optimiser step.

    The loop calls ``loss(head, outputs, labels)`` with the outputs of every bag in the
    step's batch (one bag by default; a positive and a negative bag under a pairing
    miner) and adds ``weight * value``. A loss that does not apply to a batch (e.g. a
    ranking loss without both classes) returns ``None``.
    """

    def __call__(
        self, head: MILHead, outputs: Sequence[MILOutput], labels: Sequence[int]
    ) -> torch.Tensor | None:
        """Loss value (a scalar tensor) or ``None`` when it does not apply."""
        raise NotImplementedError
