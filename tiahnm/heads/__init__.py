"""MIL heads (aggregators). Every head returns a :class:`MILOutput`."""

from tiahnm.utils.lazy import lazy_exports

__all__ = ["MILHead", "MILOutput"]
__getattr__ = lazy_exports(__name__, "tiahnm.heads.base", __all__)
