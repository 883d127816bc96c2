"""Data-parallel training: 2 gloo processes on CPU give the single-process results.

The tested equivalence: two ranks started as ``torchrun --nproc_per_node 2`` would
(``RANK``/``WORLD_SIZE``/``MASTER_*`` variables, gloo backend) with ``train.batch_size=2``
(each rank takes one bag of every step, gradients averaged) against one process with
``train.batch_size=2`` (both bags in the step, mean loss). Heads without dropout and
miners without per-bag randomness make the two bitwise-comparable up to float
rounding of the reduction. This file is also the worker script that torchrun starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parents[2]
if str(REPO) not in sys.path:  # when torchrun runs this file as a script
    sys.path.insert(0, str(REPO))

from tests.synthetic import make_bags  # noqa: E402
from tiahnm.config import TrainConfig, from_dict  # noqa: E402
from tiahnm.crossval import run_training  # noqa: E402
from tiahnm.heads.abmil import ABMIL  # noqa: E402
from tiahnm.miners.mhim import MHIMMiner  # noqa: E402
from tiahnm.runtime.distributed import env_context  # noqa: E402
from tiahnm.training.loop import fit, predict  # noqa: E402

TOL = 1e-5


def _cfg() -> TrainConfig:
    return TrainConfig(
        epochs=3,
        lr=5e-3,
        weight_decay=0.0,
        patience=100,
        progress=False,
        batch_size=2,
        scheduler="none",
    )


def _head() -> ABMIL:
    torch.manual_seed(0)
    return ABMIL(8, 2, embed_dim=16, attn_dim=8, dropout=0.0)


def _mhim() -> MHIMMiner:
    # top-k masking only: no random masking, so no per-bag randomness
    return MHIMMiner(
        mask_ratio_h=0.2,
        mask_ratio_hr=1.0,
        mask_ratio_r=0.0,
        mask_h_schedule="constant",
        momentum=0.9,
        consistency_weight=0.5,
    )


def _cv_config(out: Path, data: Path) -> object:
    return from_dict(
        {
            "output_dir": str(out),
            "data": {"source": "mil_csv", "options": {"path": str(data)}},
            "head": {"name": "abmil", "options": {"embed_dim": 16, "dropout": 0.0}},
            "train": {"epochs": 2, "lr": 0.005, "batch_size": 2, "progress": False},
            "cv": {"folds": 2, "val_fraction": 0.25, "refit": True},
            "evaluation": {"bootstrap": 0, "report": False},
        }
    )


def run_all(out: Path, data_csv: Path) -> dict:
    """What both the 1-process reference and every torchrun rank compute."""
    bags = make_bags(17)
    train, val, test = bags[:9], bags[9:14], bags[14:]  # odd sizes: uneven shards
    results = {}
    for name, miner in (("plain", None), ("mhim", _mhim())):
        head = _head()
        res = fit(head, train, val, _cfg(), miner=miner, seed=5)
        head.load_state_dict(res.best_state)
        probs, loss, _ = predict(head, test, torch.device("cpu"))
        results[name] = {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "state": res.best_state,
            "probs": torch.from_numpy(probs),
            "loss": loss,
        }
    summary = run_training(_cv_config(out, data_csv))
    results["cv"] = {
        "metrics": {k: v["mean"] for k, v in summary["metrics"].items()},
        "folds": [f["best_epoch"] for f in summary["folds"]],
    }
    return results


def _assert_same(a: dict, b: dict) -> None:
    for name in ("plain", "mhim"):
        ra, rb = a[name], b[name]
        assert ra["best_epoch"] == rb["best_epoch"]
        assert len(ra["history"]) == len(rb["history"]) == 3
        for row_a, row_b in zip(ra["history"], rb["history"], strict=True):
            assert row_a.keys() == row_b.keys()
            for key in row_a:
                assert row_a[key] == pytest.approx(row_b[key], abs=TOL), (name, key)
        for key in ra["state"]:
            torch.testing.assert_close(
                ra["state"][key], rb["state"][key], atol=TOL, rtol=0
            )
        torch.testing.assert_close(ra["probs"], rb["probs"], atol=TOL, rtol=0)
        assert ra["loss"] == pytest.approx(rb["loss"], abs=TOL)
    assert a["cv"]["folds"] == b["cv"]["folds"]
    for key, value in a["cv"]["metrics"].items():
        assert value == pytest.approx(b["cv"]["metrics"][key], abs=TOL, nan_ok=True), (
            key
        )


def test_two_gloo_processes_match_one_process(tmp_path):
    from tests.synthetic import write_mil_csv

    data_csv = tmp_path / "bags.csv"
    write_mil_csv(data_csv, make_bags(20, seed=1))
    single = run_all(tmp_path / "single", data_csv)
    # the two ranks torchrun would start, with its environment variables (starting
    # them directly saves the launcher's own torch import)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        cmd = [sys.executable, __file__, str(tmp_path / "ddp"), str(data_csv)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    for proc in procs:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output.decode()[-3000:]
    ranks = [
        torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False) for r in (0, 1)
    ]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    _assert_same(single, ranks[0])
    _assert_same(ranks[0], ranks[1])
    # rank 0 alone wrote the run's files; they hold the single-process metrics
    written = json.loads((tmp_path / "ddp" / "cv" / "summary.json").read_text())
    assert written["metrics"]["auc"]["mean"] == pytest.approx(
        single["cv"]["metrics"]["auc"], abs=TOL, nan_ok=True
    )
    assert sorted(p.name for p in (tmp_path / "ddp" / "cv" / "folds").iterdir()) == [
        "r0_f0",
        "r0_f1",
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_main() -> None:
    out, data_csv = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    os.environ["TIAHNM_NO_PROGRESS"] = "1"
    from tiahnm.runtime.distributed import init_distributed

    ctx = init_distributed("cpu")
    assert ctx == env_context()
    results = run_all(out / "cv", data_csv)
    results["world_size"] = ctx.world_size
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{ctx.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker_main()
