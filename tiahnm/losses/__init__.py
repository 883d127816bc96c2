"""Extra training objectives on a batch of head outputs."""

from tiahnm.losses.base import BatchLoss

__all__ = ["BatchLoss"]
