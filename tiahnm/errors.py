"""Error types raised by tiahnm.

Every error a user can cause by their input is a subclass of :class:`TiahnmError`, carries
a message that names the file, key or plugin at fault, and is shown by the CLI without a
traceback.
"""

from __future__ import annotations


class TiahnmError(Exception):
    """Base class of every documented tiahnm error."""


class ConfigError(TiahnmError, ValueError):
    """A configuration file or override is invalid (names the key)."""


class PluginError(TiahnmError, LookupError):
    """A plugin name is unknown or registered twice, or a plugin failed to load."""


class DataError(TiahnmError, ValueError):
    """An input data file is unreadable or inconsistent (names the file and row/key)."""


class ResourceError(TiahnmError, OSError):
    """The system refused a file operation (disk full, read-only, permissions ...)."""


class FolderLockedError(TiahnmError, RuntimeError):
    """Another live tiahnm process writes into the same output folder (names it)."""


class TrainingDivergedError(DataError):
    """The training loss became NaN or infinite (names the fold and epoch)."""


#: CLI exit codes (documented in docs/reliability.md).
EXIT_OK = 0
EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_RESOURCE = 4
EXIT_LOCKED = 5
EXIT_INTERNAL = 70

_ERRNO_HINTS = {
    "ENOSPC": "no space left on the device (disk full); free space and run again",
    "EDQUOT": "disk quota exceeded; free space and run again",
    "EROFS": "read-only file system; choose a writable output folder",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EEXIST": "exists and is not a folder",
    "ENOTDIR": "a part of this path is a file, not a folder",
    "EISDIR": "is a folder, not a file",
    "ENOENT": "no such file or folder",
    "ENAMETOOLONG": "file name too long",
    "EMFILE": "too many open files",
    "EIO": "input/output error (failing disk or network share?)",
}


def describe_os_error(exc: BaseException) -> str:
    """One line for an ``OSError`` / ``MemoryError``: the path, then what went wrong."""
    import errno as errno_mod

    if isinstance(exc, MemoryError):
        text = str(exc) or "cannot allocate memory"
        return f"out of memory ({type(exc).__name__}: {text})."
    code = getattr(exc, "errno", None)
    name = errno_mod.errorcode.get(code, "") if isinstance(code, int) else ""
    hint = _ERRNO_HINTS.get(name) or getattr(exc, "strerror", None) or str(exc)
    paths = [
        p
        for p in (getattr(exc, "filename", None), getattr(exc, "filename2", None))
        if p
    ]
    where = " -> ".join(str(p) for p in paths)
    tag = f" [{name}]" if name else f" ({type(exc).__name__}: {exc})"
    return f"{where + ': ' if where else ''}{hint}{tag}."


def error_line(exc: BaseException) -> tuple[str, int]:
    """The CLI's ``Error:`` message and exit code for any exception.

    The one place that maps failures to exit codes: documented errors keep their
    message; OS errors (disk full, read-only, permissions, a file where a folder is
    needed) and memory errors are described with the path; anything else is an
    internal error (a bug), shown in one line with where it happened.
    """
    if isinstance(exc, FolderLockedError):
        return str(exc), EXIT_LOCKED
    if isinstance(exc, (ConfigError, PluginError)):
        return str(exc), EXIT_USAGE
    if isinstance(exc, ResourceError):
        return str(exc), EXIT_RESOURCE
    if isinstance(exc, TiahnmError):
        return str(exc), EXIT_DATA
    if isinstance(exc, (OSError, MemoryError)):
        return describe_os_error(exc), EXIT_RESOURCE
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    message = (
        f"internal error ({type(exc).__name__}: {exc}){where}. This is a bug in tiahnm "
        "or a plugin; set TIAHNM_TRACEBACK=1 to see the traceback."
    )
    return message, EXIT_INTERNAL
