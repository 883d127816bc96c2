"""Package layering and function length (issue 16, item 6).

No import cycle between the sub-packages of ``tiahnm`` (lower layers never import
higher ones: ``runtime`` below ``slides`` below ``data`` ... below ``crossval``), and
no function longer than :data:`MAX_LINES`. Imports inside functions and under
``TYPE_CHECKING`` count like any other, as in ``../shared/tools/check_layers.py``,
which the last test runs when that folder is beside the repository.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "tiahnm"
TOOL = ROOT.parent / "shared" / "tools" / "check_layers.py"
MAX_LINES = 120


def _module(path: Path, root: Path) -> list[str]:
    """``tiahnm/training/loop.py`` -> ``["tiahnm", "training", "loop"]``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(node: ast.AST, module: list[str], is_pkg: bool) -> Iterator[str]:
    """The absolute names an import statement reads (relative ones resolved)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = module if is_pkg else module[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        yield name
        yield from (f"{name}.{alias.name}" for alias in node.names)


def _part(name: str, package: str) -> str | None:
    """The sub-package (or top-level module) of ``package`` that ``name`` is in."""
    bits = name.split(".")
    return bits[1] if bits[0] == package and len(bits) > 1 else None


def scan(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Import edges between the parts of the package ``root``, and its long functions.

    Returns:
        tuple: ``{part: parts it imports}`` (the package's ``__init__`` left out) and
        ``"file:line name (N lines)"`` for every function over :data:`MAX_LINES`.
    """
    graph: dict[str, set[str]] = defaultdict(set)
    long: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = _module(path, root)
        source = _part(".".join(module), root.name)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for name in _imported(node, module, path.name == "__init__.py"):
                target = _part(name, root.name)
                if source and target and target != source:
                    graph[source].add(target)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_LINES:
                    where = path.relative_to(root.parent)
                    long.append(f"{where}:{node.lineno} {node.name} ({n} lines)")
    return graph, long


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle among the parts (``[a, b, a]``), or ``[]`` when there is none."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        return list(exc.args[1])
    return []


def test_the_checks_find_a_cycle_and_a_long_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    for sub in ("low", "high", "top"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from pkg.high import x\n")  # not a layer
    (pkg / "high" / "a.py").write_text("from pkg.low.b import f\n")
    (pkg / "top" / "c.py").write_text("from ..high import a\nimport pkg.low\n")
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    (pkg / "low" / "b.py").write_text(f"def f():\n    from . import b\n{body}")
    graph, long = scan(pkg)
    assert graph == {"high": {"low"}, "top": {"high", "low"}}
    assert find_cycle(graph) == []
    assert long == [f"pkg/low/b.py:1 f ({MAX_LINES + 2} lines)"]
    # an import inside a function closes the cycle low -> high -> low
    (pkg / "low" / "b.py").write_text("def f():\n    from pkg.high.a import f\n")
    graph, long = scan(pkg)
    assert graph["low"] == {"high"} and long == []
    cycle = find_cycle(graph)
    assert set(cycle) == {"low", "high"} and cycle[0] == cycle[-1]


def test_no_import_cycle_between_packages() -> None:
    graph, _ = scan(PACKAGE)
    assert {"runtime", "slides", "data", "training", "crossval"} <= set(graph)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_function_over_the_limit() -> None:
    _, long = scan(PACKAGE)
    assert not long, "split these functions:\n" + "\n".join(long)


@pytest.mark.shared_data
def test_check_layers_tool_passes() -> None:
    if not TOOL.is_file():
        pytest.skip(f"{TOOL} not found: the shared tools folder is not beside the repo")
    args = [sys.executable, str(TOOL), "tiahnm", "--strict", "--max-lines"]
    res = subprocess.run(
        [*args, str(MAX_LINES)], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"0 package cycle(s), 0 function(s) over {MAX_LINES} lines" in res.stdout
