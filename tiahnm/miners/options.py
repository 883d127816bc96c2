"""The config key of miner options; errors name ``miner.options.<key>``.

The built-in miners declare their options as typed dataclasses (``MHIMOptions``,
``HNMOptions``, ``Li2019Options``) checked by :mod:`tiahnm.utils.options`.
"""

from __future__ import annotations

KEY = "miner.options"
