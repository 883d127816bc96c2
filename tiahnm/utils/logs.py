"""Log lines shared by the data sources and the extractor."""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger("tiahnm.filters")


def log_dropped(
    what: str, per_bag: Sequence[tuple[str, int, int]], reason: str
) -> None:
    """Log how many patches a filter dropped, per bag and in total.

    Args:
        what (str): The source (``image_patches`` ...).
        per_bag (Sequence[tuple[str, int, int]]): ``(bag id, dropped, total)``.
        reason (str): What the filter drops (``white background`` ...).
    """
    dropped = sum(d for _, d, _ in per_bag)
    total = sum(n for _, _, n in per_bag)
    for sid, d, n in per_bag:
        if d:
            logger.info(
                "%s: %s: dropped %d of %d patches (%s).", what, sid, d, n, reason
            )
    if per_bag:
        logger.info(
            "%s: dropped %d of %d patches (%.1f%%, %s) over %d bags (%d with drops).",
            what,
            dropped,
            total,
            100.0 * dropped / max(total, 1),
            reason,
            len(per_bag),
            sum(1 for _, d, _ in per_bag if d),
        )


__all__ = ["log_dropped"]
