"""Hypothesis: YAML anchors and aliases in every options mapping load in bounded time
and memory, or are refused with a ConfigError (``tiahnm/utils/safe_yaml.py``).
"""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiahnm.config import Config, load_config
from tiahnm.errors import ConfigError
from tiahnm.pipeline import settings_hash
from tiahnm.utils.safe_yaml import MAX_NODES

OPTION_PATHS = [
    "head:\n  options:\n",
    "miner:\n  options:\n",
    "data:\n  options:\n",
    "extract:\n  encoder_options:\n",
    "losses:\n  - name: mirank\n    options:\n",
]
INDENT = {
    p: " " * (len(p.splitlines()[-1]) - len(p.splitlines()[-1].lstrip()) + 2)
    for p in OPTION_PATHS
}


@st.composite
def alias_documents(draw: st.DrawFn) -> str:
    """An options mapping whose keys hold anchors that alias earlier anchors."""
    where = draw(st.sampled_from(OPTION_PATHS))
    pad = INDENT[where]
    # dense: every item aliases the previous anchor (width ** n_anchors nodes, the
    # "billion laughs" shape, 4**8 = 65536 nodes at least); otherwise a random mix
    # of scalars and aliases
    dense = draw(st.booleans())
    n_anchors = draw(st.integers(8, 12) if dense else st.integers(1, 12))
    lines = []
    for i in range(n_anchors):
        width = draw(st.integers(4, 10) if dense else st.integers(1, 10))
        items = []
        for _ in range(width):
            if dense and i:
                items.append(f"*a{i - 1}")
            elif i and draw(st.booleans()):
                items.append(f"*a{draw(st.integers(0, i - 1))}")
            else:
                items.append(draw(st.sampled_from(["x", "1", "2.5", "true", "null"])))
        if draw(st.booleans()):
            body = "[" + ", ".join(items) + "]"
        else:
            body = "{" + ", ".join(f"k{j}: {v}" for j, v in enumerate(items)) + "}"
        lines.append(f"{pad}key{i}: &a{i} {body}")
    if n_anchors > 1 and draw(st.booleans()):  # a merge key over a mapping anchor
        lines.append(f"{pad}merged: {{<<: *a{n_anchors - 1}}}")
    return where + "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", OPTION_PATHS)
def test_every_options_path_is_reachable(tmp_path, where):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(where + INDENT[where] + "key: &a [x]\n" + INDENT[where] + "k2: *a\n")
    config = load_config(cfg)
    assert json.dumps(config.to_dict()).count('"x"') == 2


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(doc=alias_documents())
def test_aliases_load_in_bounded_time_and_memory(tmp_path, doc):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(doc)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        config = load_config(cfg)
    except ConfigError:  # an alias bomb, or e.g. a merge key over a sequence
        config = None
    else:
        # what later stages do with the options: copy, hash, dump
        text = json.dumps(config.to_dict())
        settings_hash(config.to_dict())
        assert len(text) < 40 * MAX_NODES
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 5.0
    assert peak < 200 * 2**20
    assert config is None or isinstance(config, Config)
