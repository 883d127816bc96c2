"""SIGKILL ``tiahnm run`` mid-extraction, run it again, compare with an uninterrupted run.

The killed run is a subprocess over six small generated slides; it is killed as soon as
the first feature file appears. The reference and the resumed run go through the same
``tiahnm run`` command in this process (one thread, as the subprocess).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tests.slides.conftest import make_image, write_pyramid
from tiahnm.cli import cli

pytestmark = pytest.mark.slow

N_SLIDES = 6


def _setup(root: Path) -> Path:
    slides = root / "slides"
    slides.mkdir()
    for i in range(N_SLIDES):
        write_pyramid(slides / f"s{i}.tif", make_image(seed=i))
    labels = root / "labels.csv"
    labels.write_text(
        "slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(N_SLIDES))
    )
    config = root / "run.yaml"
    config.write_text(
        f"""
extract:
  slides: [{slides}]
  resolution: 0.5
  patch_size: 64
  num_workers: 0
  batch_size: 8
data:
  source: h5_folder
  options: {{labels_csv: {labels}}}
head: {{name: abmil, options: {{embed_dim: 16}}}}
train: {{epochs: 3, num_threads: 1, progress: false}}
cv: {{folds: 2}}
evaluation: {{bootstrap: 0, report: false}}
"""
    )
    return config


def _run(config: Path, out: Path) -> None:
    res = CliRunner().invoke(cli, ["run", str(config), "--output-path", str(out)])
    assert res.exit_code == 0, res.output


def _features(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path) as f:
            out[path.stem] = (f["features"][()], f["coords"][()])
    return out


def test_sigkill_mid_extraction_then_resume_matches(tmp_path):
    config = _setup(tmp_path)
    full = tmp_path / "full"
    _run(config, full)

    cut = tmp_path / "cut"
    env = dict(os.environ, TIAHNM_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "tiahnm",
        "run",
        str(config),
        "--output-path",
        str(cut),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    feats = cut / "features"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if list(feats.glob("*.h5")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    before = {p.stem: p.stat().st_mtime_ns for p in feats.glob("*.h5")}
    assert 1 <= len(before) < N_SLIDES  # killed mid-extraction
    assert not (feats / "extract_summary.json").exists()
    assert not (cut / "summary.json").exists()

    _run(config, cut)  # the same command resumes
    summary = json.loads((feats / "extract_summary.json").read_text())
    status = {r["slide"]: r["status"] for r in summary["slides"]}
    # slides finished before the kill are skipped, each other slide is done once
    assert status == {
        f"s{i}": "skipped" if f"s{i}" in before else "done" for i in range(N_SLIDES)
    }
    for sid, mtime in before.items():
        assert (feats / f"{sid}.h5").stat().st_mtime_ns == mtime
    assert not list(cut.rglob("*.tmp"))

    expected, got = _features(full / "features"), _features(feats)
    assert sorted(got) == sorted(expected) == [f"s{i}" for i in range(N_SLIDES)]
    for sid, (f_exp, c_exp) in expected.items():
        np.testing.assert_array_equal(got[sid][0], f_exp)
        np.testing.assert_array_equal(got[sid][1], c_exp)
    assert (cut / "predictions.csv").read_text() == (
        full / "predictions.csv"
    ).read_text()
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert a["metrics"] == b["metrics"]
