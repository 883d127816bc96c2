"""Extraction sharded by slide over 2 gloo processes equals one process.

The two ranks are started with the environment ``torchrun --nproc_per_node 2`` gives
them (starting them directly saves the launcher's own start-up).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tests.slides.conftest import make_image, write_pyramid
from tiahnm.cli import cli

pytestmark = pytest.mark.slow

N_SLIDES = 5
ARGS = ["--resolution", "0.5", "--patch-size", "64", "--batch-size", "8"]
ARGS += ["--num-workers", "0", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _arrays(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path) as f:
            out[path.stem] = (f["features"][()], f["coords"][()])
    return out


def test_two_processes_extract_what_one_process_does(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(N_SLIDES):
        write_pyramid(slides / f"s{i}.tif", make_image(seed=i))
    (slides / "broken.svs").write_bytes(b"not a slide")

    one = tmp_path / "one"
    res = CliRunner().invoke(
        cli, ["extract", str(slides), "--output-path", str(one), *ARGS]
    )
    assert res.exit_code == 3, res.output  # the broken slide: partial success

    two = tmp_path / "two"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TIAHNM_NO_PROGRESS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        cmd = [sys.executable, "-m", "tiahnm", "extract", str(slides)]
        procs.append(
            subprocess.Popen(
                [*cmd, "--output-path", str(two), *ARGS],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 3, output.decode()[-3000:]

    expected, got = _arrays(one), _arrays(two)
    assert sorted(got) == sorted(expected) == [f"s{i}" for i in range(N_SLIDES)]
    for sid, (feats, coords) in expected.items():
        np.testing.assert_allclose(got[sid][0], feats, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got[sid][1], coords)
    # rank 0 wrote one merged summary and failures file covering every slide
    a = json.loads((one / "extract_summary.json").read_text())
    b = json.loads((two / "extract_summary.json").read_text())
    status = {r["slide"]: r["status"] for r in b["slides"]}
    assert status == {r["slide"]: r["status"] for r in a["slides"]}
    assert status["broken"] == "failed"
    assert (two / "failures.csv").read_text() == (one / "failures.csv").read_text()
    assert not list(two.rglob("*.tmp"))
