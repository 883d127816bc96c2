"""Shared fixtures of the test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tiahnm.plugins import reset_plugin_manager

REPO_ROOT = Path(__file__).parents[1]

# The test models are tiny: one intra-op thread is faster than two on the 2-core CI
# machine (thread hand-off costs more than the work) and keeps timings stable.
torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real-data tests); skip when absent."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(
            "../shared/data not found: "
            "real-data tests need the shared folder beside the repo"
        )
    return path


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No progress bars, no third-party plugins, a fresh plugin manager per test.

    The suite is hermetic: entry points installed in the test environment are not
    loaded (tests of plugin loading unset the switch and use their own folders).
    """
    monkeypatch.setenv("TIAHNM_NO_PROGRESS", "1")
    monkeypatch.setenv("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("TIAHNM_LOAD_PLUGINS", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()
