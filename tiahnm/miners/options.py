"""Checks of miner options; errors name ``miner.options.<key>``."""

from __future__ import annotations

from typing import Any

from tiahnm.errors import ConfigError

KEY = "miner.options"


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else a :class:`ConfigError`."""
    if value not in allowed:
        msg = f"{KEY}.{name} must be one of {', '.join(allowed)}; got {value!r}."
        raise ConfigError(msg)
    return str(value)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer >= 1 (not a bool), else a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{KEY}.{name} must be an integer >= 1, got {value!r}."
        raise ConfigError(msg)
    return value
