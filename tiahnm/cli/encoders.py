"""``tiahnm encoders``: the model cards of the registered encoder presets."""

from __future__ import annotations

import json
from typing import Any

import click

from tiahnm.cli import CONTEXT_SETTINGS, _guard

COLUMNS = ("name", "dim", "params", "input", "µm/px", "patch", "licence", "gated")


def _human(n: int) -> str:
    if n <= 0:
        return "n/a"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _row(card: dict[str, Any]) -> tuple[str, ...]:
    size = card["input"] or "patch"
    interp = card["interpolation"] if card["resize_size"] else ""
    return (
        card["name"],
        str(card["out_dim"]),
        _human(card["n_params"]),
        f"{size} {interp}".strip(),
        f"{card['mpp']:g}",
        str(card["patch_px"]),
        card["licence"],
        "yes" if card["gated"] else "no",
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_guard
def encoders(as_json: bool) -> None:  # noqa: FBT001 - click flag
    """List the named encoder presets (model cards): dim, size, licence, gating.

    Use one with `tiahnm extract --encoder NAME --weights FILE_OR_FOLDER`; see
    docs/encoders.md for the sources of every figure.
    """
    from tiahnm.encoders.presets import registered_presets

    cards = [p.card() for p in registered_presets().values()]
    if as_json:
        click.echo(json.dumps(cards, indent=2))
        return
    rows = [COLUMNS, *(_row(c) for c in cards)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        click.echo(
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        )
