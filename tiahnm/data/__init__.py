"""Bags and bag sources (dataset readers)."""

from tiahnm.utils.lazy import lazy_exports

__all__ = ["Bag", "BagSource"]
__getattr__ = lazy_exports(__name__, "tiahnm.data.bag", __all__)
