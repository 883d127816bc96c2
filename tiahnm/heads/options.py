"""Options shared by the built-in heads, declared once (see :mod:`tiahnm.utils.options`).

A head family subclasses :class:`HeadOptions` with its own fields; the instance
projection options (``embed_dim``, ``dropout``, ``act``) come from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiahnm.utils.options import Options, option

#: Config key of head options (errors name ``head.options.<option>``).
KEY = "head.options"
ACTIVATIONS = ("relu", "gelu")


@dataclass(frozen=True)
class HeadOptions(Options):
    """The instance projection ``D -> E`` of :class:`~tiahnm.heads.base.MILHead`."""

    embed_dim: int = option(512, low=1, help="Projection width E.")
    dropout: float = option(
        0.25, low=0, high=1, help="Dropout after the projection (0: none)."
    )
    act: str = option("relu", choices=ACTIVATIONS, help="Activation of the projection.")
