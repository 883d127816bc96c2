"""Extra training objectives on a batch of head outputs."""

from tiahnm.utils.lazy import lazy_exports

__all__ = ["BatchLoss"]
__getattr__ = lazy_exports(__name__, "tiahnm.losses.base", __all__)
