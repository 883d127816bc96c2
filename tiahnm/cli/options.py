"""Click option factories shared by the commands (TIAToolbox-style names)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


def cli_set(**kwargs: Any) -> Callable[[F], F]:
    """``--set key.sub=value`` (repeatable) config overrides."""
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config key (YAML value), e.g. --set train.epochs=50. Repeatable.",
        **kwargs,
    )


def cli_output_path(**kwargs: Any) -> Callable[[F], F]:
    """``--output-path``: where results go (overrides ``output_dir``)."""
    return click.option(
        "--output-path",
        type=click.Path(file_okay=False),
        default=None,
        help="Output directory (overrides output_dir in the config).",
        **kwargs,
    )


def cli_device(**kwargs: Any) -> Callable[[F], F]:
    """``--device``: auto, cpu, cuda, cuda:N."""
    return click.option(
        "--device",
        default=None,
        help="Device: auto (CUDA when present), cpu, cuda, cuda:N.",
        **kwargs,
    )


def cli_seed(**kwargs: Any) -> Callable[[F], F]:
    """``--seed``."""
    return click.option("--seed", type=int, default=None, help="Random seed.", **kwargs)
