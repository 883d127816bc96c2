"""Kill a training run mid-fold with SIGKILL, resume it, compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.synthetic import make_bags, write_mil_csv

pytestmark = pytest.mark.slow


def command(csv, out):
    return [
        sys.executable,
        "-m",
        "tiahnm",
        "train",
        "--mil-csv",
        str(csv),
        "--head",
        "abmil",
        "--folds",
        "2",
        "--epochs",
        "40",
        "--output-path",
        str(out),
        "--set",
        "head.options.embed_dim=32",
        "--set",
        "train.lr=0.002",
        "--set",
        "train.patience=100",
        "--set",
        "train.num_threads=1",
    ]


def test_sigkill_mid_training_then_resume_matches(tmp_path):
    csv = tmp_path / "bags.csv"
    write_mil_csv(csv, make_bags(30, max_n=40))
    env = dict(os.environ, TIAHNM_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    subprocess.run(
        command(csv, tmp_path / "full"), env=env, check=True, capture_output=True
    )

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        command(csv, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = cut / "folds" / "r0_f1" / "last.pt"  # the second fold is under way
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run finished before it could be killed; make it longer"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (cut / "folds" / "r0_f0" / "result.json").is_file()
    assert not (cut / "summary.json").exists()
    # nothing half-written under a final name (a kill during a write may leave a
    # temporary file beside it; the resumed run removes it)
    json.loads((cut / "folds" / "r0_f0" / "result.json").read_text())
    stale = cut / "folds" / "r0_f1" / ".last.pt.killed.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 60, time.time() - 60))

    subprocess.run(command(csv, cut), env=env, check=True, capture_output=True)
    assert not list(cut.rglob("*.tmp"))
    assert (cut / "predictions.csv").read_text() == (
        tmp_path / "full" / "predictions.csv"
    ).read_text()
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["metrics"] == full["metrics"]
    assert resumed["folds"] == full["folds"]
