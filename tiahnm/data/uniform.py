"""One cohort, one encoder: refuse feature folders that mix encoders or widths."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tiahnm.errors import DataError


@dataclass(frozen=True)
class FeatureOrigin:
    """What made one feature file.

    Attributes:
        path (str): The file.
        encoder (str | None): Encoder/preset name recorded in the file (None:
            not recorded).
        width (int): Feature width ``D``.
    """

    path: str
    encoder: str | None
    width: int


def check_uniform(origins: Sequence[FeatureOrigin]) -> None:
    """Raise when the files come from more than one encoder or width.

    Files that do not record their encoder are grouped by width only.

    Raises:
        DataError: Names the files of each group (a few of each).
    """
    by_width: dict[int, list[str]] = defaultdict(list)
    by_encoder: dict[str, list[str]] = defaultdict(list)
    for o in origins:
        by_width[o.width].append(o.path)
        if o.encoder:
            by_encoder[o.encoder].append(o.path)
    for kind, groups in (("feature widths", by_width), ("encoders", by_encoder)):
        if len(groups) > 1:
            parts = [
                f"{key}: {_few(paths)}"
                for key, paths in sorted(groups.items(), key=lambda kv: str(kv[0]))
            ]
            msg = (
                f"the feature files mix {kind} ({'; '.join(parts)}); extract the "
                "whole cohort with one encoder."
            )
            raise DataError(msg)


def _few(paths: list[str], n: int = 3) -> str:
    names = ", ".join(str(Path(p)) for p in paths[:n])
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return f"{len(paths)} file(s) {names}{more}"


def h5_encoder_name(path: str | Path) -> str | None:
    """The ``encoder`` attribute of an HDF5 feature file (tiahnm, STAMP), or None."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("encoder", f.attrs.get("extractor"))
    except OSError:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return str(value) if value is not None else None
