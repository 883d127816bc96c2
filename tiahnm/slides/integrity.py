"""Cheap integrity checks of slide files before they are read.

A TIFF-based slide cut short (an interrupted copy, a full disk) may still open, and
JPEG decoders fill the missing part of a tile with grey instead of failing, so its
features would be computed from invented pixels. Every page's declared strips/tiles
must end inside the file; only the TIFF directories are read for this.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tiahnm.errors import DataError

logger = logging.getLogger(__name__)

#: Suffixes of slide formats stored as TIFF (checked by :func:`check_tiff_complete`).
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")


def check_tiff_complete(path: str | Path) -> None:
    """Raise :class:`DataError` when a TIFF page's image data extends past the end.

    Files tifffile cannot parse are left to the slide reader (which reports them).
    """
    import tifffile

    path = Path(path)
    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            for index, page in enumerate(tif.pages):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if not offsets.size:
                    continue
                end = int((offsets + counts).max())
                if end > size:
                    msg = (
                        f"{path}: truncated slide file: page {index}'s image data "
                        f"ends at byte {end} but the file has {size} bytes (an "
                        "interrupted copy?)."
                    )
                    raise DataError(msg)
    except DataError:
        raise
    except Exception:  # not parseable as TIFF here: the reader reports it
        logger.debug("%s: TIFF integrity check skipped", path, exc_info=True)
