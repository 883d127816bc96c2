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
