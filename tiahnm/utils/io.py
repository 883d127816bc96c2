"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: Longest prefix of a temporary name: 255 bytes less mkstemp's 8 random characters
#: and the ``.tmp`` suffix, with room to spare.
_MAX_PREFIX_BYTES = 200


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path that is renamed onto ``path`` when the block succeeds.

    A crash inside the block leaves ``path`` untouched (old content or absent), and the
    temporary file is removed.

    Args:
        path (str | PathLike): Final destination.

    Yields:
        Path: Temporary file in the same directory (same filesystem, so the rename is
        atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name must fit where the final name fits (255 bytes on most file
    # systems): a long name is shortened (the random part keeps it unique).
    # The suffix (.h5 ...) is kept, so cleaning up by pattern still finds it.
    stem, suffix = path.name[: len(path.name) - len(path.suffix)], path.suffix
    while stem and len(f".{stem}{suffix}.".encode()) > _MAX_PREFIX_BYTES:
        stem = stem[:-1]
    prefix = f".{stem}{suffix}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the usual umask permissions.
        tmp_path.chmod(0o666 & ~_umask())
        tmp_path.replace(path)
    except OSError as exc:
        if exc.filename is None:  # a failed write(2)/fsync(2): name the file
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(folder: str | os.PathLike[str], *, older_than: float) -> int:
    """Delete temporary files :func:`atomic_path` left under ``folder`` (recursively).

    Only safe while no other writer uses ``folder`` (the caller holds its lock): a
    temporary file last written before ``older_than`` then belongs to a writer that
    was killed before its rename (the processes of this run, e.g. other torchrun
    ranks, write theirs later).

    Args:
        folder (str | PathLike): Folder to clean.
        older_than (float): Epoch seconds; newer temporary files are kept.

    Returns:
        int: Number of files removed.
    """
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            if not tmp.is_file() or tmp.stat().st_mtime >= older_than:
                continue
            tmp.unlink()
            removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", **kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` atomically on close.

    Args:
        path (str | PathLike): Final destination.
        mode (str): ``"w"`` or ``"wb"``.
        **kwargs: Passed to :func:`open`.

    Yields:
        IO: The open temporary file.
    """
    with atomic_path(path) as tmp, tmp.open(mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    msg = f"Object of type {type(obj).__name__} is not JSON serialisable"
    raise TypeError(msg)
