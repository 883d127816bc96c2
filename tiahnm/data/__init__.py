"""Bags and bag sources (dataset readers)."""

from tiahnm.data.bag import Bag, BagSource

__all__ = ["Bag", "BagSource"]
