"""Where a figure came from: git commit, versions, hardware and command line.

Every benchmark writes its JSON through :func:`write_result`, so each result file says
which code, libraries, machine and arguments produced it.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tiahnm.utils.io import write_json

PACKAGES = (
    "tiahnm",
    "torch",
    "torchvision",
    "tiatoolbox",
    "timm",
    "numpy",
    "scikit-learn",
)


def git_commit(repo: str | Path | None = None) -> dict[str, Any]:
    """The checked-out commit of ``repo`` (default: this file's checkout).

    Returns:
        dict: ``commit`` (40 hex digits, or ``None`` outside a git checkout) and
        ``dirty`` (uncommitted changes to tracked files, or ``None``).
    """
    where = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(where), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (``None`` where not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU model and count, torch threads, and the GPUs torch sees."""
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "torch_build": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything :func:`write_result` stamps on a result."""
    return {
        **git_commit(),
        "versions": package_versions(),
        "hardware": hardware(),
        "argv": list(sys.argv if argv is None else argv),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_result(
    path: str | Path,
    payload: dict[str, Any],
    argv: Sequence[str] | None = None,
    *,
    stamp: dict[str, Any] | None = None,
) -> Path:
    """Write ``payload`` as JSON with a ``provenance`` block, atomically.

    Args:
        path (str | Path): Output file (parents are created).
        payload (dict): The figures; must not already hold ``provenance``.
        argv (Sequence[str] | None): Command line to record (default ``sys.argv``).
        stamp (dict | None): A :func:`provenance` taken earlier (e.g. when the
            measured runs started, if the checkout may change before the write).

    Returns:
        Path: The written file.
    """
    if "provenance" in payload:
        msg = "payload already has a 'provenance' key"
        raise ValueError(msg)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"provenance": stamp or provenance(argv), **payload})
    return out


__all__ = [
    "cpu_model",
    "git_commit",
    "hardware",
    "package_versions",
    "provenance",
    "write_result",
]
