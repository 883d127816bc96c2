"""YAML loading that refuses alias bombs and recursive aliases at load time.

``yaml.safe_load`` shares the object of an anchor between its aliases, so a "billion
laughs" document of 1 KB loads fast, but any later copy (``dataclasses.asdict``, JSON
hashing, dumping the resolved config) expands it exponentially. Here the composed node
graph is measured first: the number of nodes the document would have with every alias
expanded is counted (in time linear in the document, by memoising each node's size),
and a document above :data:`MAX_NODES` expanded nodes, or with an alias inside its own
anchor (a recursive structure), is refused before any Python object is built.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

#: Default limit of expanded nodes (scalars + collections) in one YAML document.
MAX_NODES = 100_000
#: Environment variable that raises (or lowers) :data:`MAX_NODES`.
MAX_NODES_ENV = "TIAHNM_YAML_MAX_NODES"


class YAMLBombError(ValueError):
    """A document expands beyond the node limit or holds a recursive alias."""


def max_nodes() -> int:
    """The node limit: ``$TIAHNM_YAML_MAX_NODES`` when set, else :data:`MAX_NODES`."""
    raw = os.environ.get(MAX_NODES_ENV, "")
    return int(raw) if raw.strip().isdigit() else MAX_NODES


def expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes of ``root`` with every alias expanded; raises past ``limit`` or on a cycle.

    Iterative (no recursion limit on deep documents) and memoised on node identity,
    so a shared anchor is measured once however often it is aliased.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(sizes[id(c)] for c in _children(node))
            if total > limit:
                msg = (
                    f"the document expands to more than {limit} nodes (YAML aliases "
                    f"repeating an anchor, line {node.start_mark.line + 1}); refused as "
                    f"a possible alias bomb (raise the limit with {MAX_NODES_ENV})"
                )
                raise YAMLBombError(msg)
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            msg = (
                f"recursive YAML alias at line {node.start_mark.line + 1} (an alias "
                "inside its own anchor); refused"
            )
            raise YAMLBombError(msg)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def safe_load(text: str, *, limit: int | None = None) -> Any:
    """``yaml.safe_load(text)`` after checking the expanded size of the document.

    Raises:
        YAMLBombError: More than ``limit`` (default :func:`max_nodes`) expanded nodes,
            or a recursive alias.
        yaml.YAMLError: Not valid YAML (as ``yaml.safe_load``).
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node, max_nodes() if limit is None else limit)
        return loader.construct_document(node)
    finally:
        loader.dispose()
