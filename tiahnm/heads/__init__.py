"""MIL heads (aggregators). Every head returns a :class:`MILOutput`."""

from tiahnm.heads.base import MILHead, MILOutput

__all__ = ["MILHead", "MILOutput"]
