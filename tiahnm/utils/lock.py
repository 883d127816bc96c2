"""One writer per output folder: an advisory lock that survives ``kill -9``.

``<folder>/.tiahnm.lock`` holds the holder's pid, host, start time and command (JSON)
and is locked with ``fcntl.flock``. The kernel drops a flock when its process dies, so
a lock left by a killed run is *stale*: the file is there but nobody holds the flock.
The next run takes it over (and logs the previous holder); a live holder makes it fail
at once with :class:`~tiahnm.errors.FolderLockedError` naming the holder.

Locks are re-entrant within a process (``tiahnm run`` locks the output folder, then
its training stage locks it again) and are released when the outermost ``with``
block ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tiahnm.errors import FolderLockedError
from tiahnm.utils.io import remove_stale_temps

logger = logging.getLogger(__name__)

LOCK_NAME = ".tiahnm.lock"

_HELD: dict[str, tuple[IO[str], int]] = {}
#: Temporary files older than this process are a killed writer's (see folder_lock).
_PROCESS_START = time.time()


def _holder_info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:500],
    }


def read_holder(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder recorded in ``folder``'s lock file (None if absent or unreadable)."""
    try:
        info = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (no holder recorded)"
    return (
        f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')} "
        f"({info.get('command', '?')})"
    )


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike[str], *, enabled: bool = True
) -> Iterator[None]:
    """Hold the write lock of ``folder`` (created) for the block.

    Args:
        folder (str | PathLike): The output folder.
        enabled (bool): False does nothing (e.g. on the non-zero ranks of torchrun,
            which write nothing but share rank 0's folder).

    Raises:
        FolderLockedError: A live process holds the lock (names pid, host, start time
            and command).
    """
    if not enabled:
        yield
        return
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        fh, depth = _HELD[key]
        _HELD[key] = (fh, depth + 1)
        try:
            yield
        finally:
            _release(key)
        return
    path = folder / LOCK_NAME
    fh = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        msg = (
            f"{folder}: output folder in use by {_describe(read_holder(folder))}; "
            "wait for it to finish, or use another output folder. (Two runs writing "
            "one folder would mix their checkpoints and results.)"
        )
        raise FolderLockedError(msg) from None
    previous = read_holder(folder)
    if previous and previous.get("pid") != os.getpid():
        logger.info(
            "Taking over the stale lock of %s in %s.", _describe(previous), folder
        )
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(_holder_info()) + "\n")
    fh.flush()
    # Holding the lock, any temporary file here is a killed writer's: drop it.
    if removed := remove_stale_temps(folder, older_than=_PROCESS_START):
        logger.info("Removed %d unfinished temporary file(s) in %s.", removed, folder)
    _HELD[key] = (fh, 1)
    try:
        yield
    finally:
        _release(key)


def _release(key: str) -> None:
    fh, depth = _HELD[key]
    if depth > 1:
        _HELD[key] = (fh, depth - 1)
        return
    del _HELD[key]
    with contextlib.suppress(OSError):
        fh.seek(0)
        fh.truncate()  # a clean exit leaves an empty (not stale) lock file
    fh.close()  # closing drops the flock
