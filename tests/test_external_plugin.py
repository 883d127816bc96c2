"""The example third-party plugin, installed with pip and used from the command line.

The module-scoped fixture pip-installs ``plugins/tiahnm-topk-miner`` into a private
folder (``pip install --target``), never into the test interpreter's environment; the
tests run ``tiahnm`` in subprocesses with that folder on ``PYTHONPATH``, so the plugin
is found through its entry point exactly as for a user, and nothing outlives the tests.
"""

from __future__ import annotations

import csv
import importlib
import importlib.metadata as md
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).parents[1]
PLUGIN_SRC = REPO_ROOT / "plugins" / "tiahnm-topk-miner"
DIST_NAME = "tiahnm-topk-miner"
DIST_VERSION = "0.1.0"
TIMEOUT_S = 600


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        check=False,
    )


def _can_build_without_isolation() -> bool:
    """True when this environment can build the plugin's wheel by itself.

    setuptools >= 61 reads ``[project]``; before 70.1 it needs the separate ``wheel``
    package for ``bdist_wheel``. Otherwise pip builds in an isolated environment,
    which downloads setuptools from the package index.
    """
    try:
        version = md.version("setuptools")
    except md.PackageNotFoundError:
        return False
    major_minor = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if major_minor < (61, 0):
        return False
    return major_minor >= (70, 1) or importlib.util.find_spec("wheel") is not None


_TARGET: list[Path] = []  # the private install folder, set by the fixture


def _installed_version() -> str | None:
    """Version of the plugin as an interpreter with the private folder sees it."""
    found = [
        d.version
        for d in md.distributions(path=[str(p) for p in _TARGET])
        if d.metadata["Name"] == DIST_NAME
    ]
    return found[0] if found else None


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``pip install --target`` the example plugin into a folder of this module."""
    if _pip("--version").returncode != 0:
        pytest.skip("pip is not available in the test environment")
    # Build from a copy, so the in-tree build leaves no build/ or *.egg-info behind.
    src = tmp_path_factory.mktemp("plugin-src") / PLUGIN_SRC.name
    shutil.copytree(
        PLUGIN_SRC,
        src,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"),
    )
    target = tmp_path_factory.mktemp("plugin-site")
    args = ["install", "--no-deps", "--target", str(target)]
    if _can_build_without_isolation():
        args.append("--no-build-isolation")
    result = _pip(*args, str(src))
    if result.returncode != 0:
        pytest.fail(
            f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    _TARGET[:] = [target]
    try:
        yield
    finally:
        _TARGET.clear()
    with pytest.raises(md.PackageNotFoundError):
        md.version(DIST_NAME)  # the test interpreter's environment never saw it


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", "TIAHNM_LOAD_PLUGINS")
    }
    env["TIAHNM_NO_PROGRESS"] = "1"
    if _TARGET:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_TARGET[0]), *filter(None, [env.get("PYTHONPATH")])]
        )
    env.update(extra)
    return env


def tiahnm(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``tiahnm`` command line in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", "from tiahnm.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or _env(),
        timeout=TIMEOUT_S,
        check=False,
    )


def write_mil_csv(path: Path, n_bags: int = 20, dim: int = 8, seed: int = 0) -> None:
    """Classic MIL CSV; each positive bag holds one instance shifted by +3."""
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        for i in range(n_bags):
            label = i % 2
            feats = rng.normal(size=(int(rng.integers(5, 11)), dim))
            if label:
                feats[rng.integers(len(feats))] += 3.0
            for row in feats:
                writer.writerow([label, f"bag{i:02d}", *(f"{v:.5f}" for v in row)])


def test_plugin_is_listed_with_its_package(
    installed_plugin: None, tmp_path: Path
) -> None:
    assert _installed_version() == DIST_VERSION
    result = tiahnm("plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    rows = {(r["kind"], r["name"]): r for r in payload["plugins"]}
    for kind, name in (("miner", "topk"), ("head", "topk_mean")):
        row = rows[kind, name]
        assert (row["package"], row["version"]) == (DIST_NAME, DIST_VERSION)
        assert row["plugin"] == "topk_miner"
        assert row["description"]
    assert rows["head", "abmil"]["package"] == "tiahnm"
    assert "topk_miner" not in {f["name"] for f in payload["failures"]}

    table = tiahnm("plugins", "--kind", "miner", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("topk "))
    assert DIST_NAME in line
    assert DIST_VERSION in line


def test_plugin_autoload_can_be_disabled(
    installed_plugin: None, tmp_path: Path
) -> None:
    env = _env(TIAHNM_DISABLE_PLUGIN_AUTOLOAD="1")
    result = tiahnm("plugins", "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    names = {r["name"] for r in json.loads(result.stdout)["plugins"]}
    assert "none" in names
    assert not names & {"topk", "topk_mean"}


def test_train_with_the_plugin(installed_plugin: None, tmp_path: Path) -> None:
    data = tmp_path / "bags.csv"
    write_mil_csv(data)
    out = tmp_path / "run"
    config = {
        "output_dir": str(out),
        "seed": 0,
        "data": {"source": "mil_csv", "options": {"path": str(data)}},
        "head": {"name": "topk_mean", "options": {"k": 2, "embed_dim": 16}},
        "miner": {"name": "topk", "options": {"drop_ratio": 0.2, "p": 0.5}},
        "cv": {"folds": 2, "repeats": 1},
        "train": {"epochs": 3, "progress": False, "device": "cpu"},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")

    result = tiahnm("train", str(config_path), cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["head"], summary["miner"]) == ("topk_mean", "topk")
    assert summary["n_folds"] == 2
    auc = summary["metrics"]["auc"]["mean"]
    assert isinstance(auc, float)
    assert math.isfinite(auc)
    assert 0.0 <= auc <= 1.0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["miner"] == {"name": "topk", "options": {"drop_ratio": 0.2, "p": 0.5}}
    assert saved["head"]["name"] == "topk_mean"
    # the plugin miner's records become its own gallery in report.html
    mined = json.loads((out / "folds" / "r0_f0" / "mined.json").read_text())
    assert mined["miner"] == "topk"
    assert {r["kind"] for r in mined["records"]} == {"masked instances (topk)"}
    assert 1 <= len({r["slide_id"] for r in mined["records"]}) <= 2  # 2 sample bags
    page = (out / "report.html").read_text()
    assert "<h3>masked instances (topk)</h3>" in page


def test_the_plugin_callback_logs_every_epoch(
    installed_plugin: None, tmp_path: Path
) -> None:
    """The plugin's ``jsonl_log`` callback (no core edit) gets every epoch row."""
    listed = tiahnm("plugins", "--json", cwd=tmp_path)
    rows = {(r["kind"], r["name"]): r for r in json.loads(listed.stdout)["plugins"]}
    assert rows["callback", "jsonl_log"]["package"] == DIST_NAME

    data = tmp_path / "bags.csv"
    write_mil_csv(data)
    out = tmp_path / "run"
    config = {
        "output_dir": str(out),
        "data": {"source": "mil_csv", "options": {"path": str(data)}},
        "head": {"name": "abmil", "options": {"embed_dim": 16}},
        "cv": {"folds": 2, "repeats": 1},
        "train": {"epochs": 3, "progress": False, "device": "cpu"},
        "evaluation": {"bootstrap": 0, "report": False},
        "callbacks": [{"name": "jsonl_log", "options": {"path": "rows.jsonl"}}],
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = tiahnm("train", str(config_path), cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    lines = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    expected = []
    for fold_dir in sorted((out / "folds").iterdir()):
        history = json.loads((fold_dir / "result.json").read_text())["history"]
        expected += [
            {"fold": fold_dir.name, "step": i, **h} for i, h in enumerate(history)
        ]
    assert lines == expected
    assert len(lines) == 6
