"""benchmarks/gpu_suite.py: refuses without a GPU; its dry run covers every workload."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_without_a_gpu(suite, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "suite.json"
    assert suite.main(["--out", str(out)]) == 2
    assert "Error: gpu_suite needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def _positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_dry_run_runs_every_workload(suite, tmp_path) -> None:
    out = tmp_path / "suite.json"
    assert suite.main(["--dry-run", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["dry_run"] is True and got["device"] == "cpu"
    assert got["versions"]["torch"] == torch.__version__
    if (SUITE.parents[1] / ".git").exists():  # a checkout (worktrees: a .git file)
        assert len(got["commit"]) == 40
    w = got["workloads"]
    assert set(w) == {"loop_overhead", "mhim_speed", "extraction", "compile", "ddp"}
    for name, result in w.items():
        assert isinstance(result, list) or "failed" not in result, (name, result)
    heads = [r["head"] for r in w["loop_overhead"]]
    assert heads == list(suite.HEADS)
    for r in w["loop_overhead"]:
        assert _positive(r["ours_epoch_s"], r["reference_epoch_s"])
        assert r["ratio"] == pytest.approx(r["ours_epoch_s"] / r["reference_epoch_s"])
        assert r["ours_peak_mib"] >= 0
    (m,) = w["mhim_speed"]
    assert m["preset"] == "c16_abmil" and _positive(m["ratio"])
    (e,) = w["extraction"]
    assert e["encoder"] == "timm:vit_small_patch16_224" and e["n_patches"] == 8
    assert _positive(e["extract_s"], e["forward_only_s"], e["fraction_of_forward"])
    (c,) = w["compile"]
    assert c["backend"] == "eager" and _positive(c["speedup"])
    assert w["ddp"]["backend"] == "gloo" and w["ddp"]["world_size"] == 2
    assert _positive(w["ddp"]["speedup"])


def test_spent_budget_skips_workloads(suite, tmp_path) -> None:
    out = tmp_path / "suite.json"
    argv = ["--dry-run", "--out", str(out), "--budget-s", "0"]
    assert suite.main([*argv, "--workloads", "mhim_speed", "ddp"]) == 0
    w = json.loads(out.read_text())["workloads"]
    skipped = {"skipped": "time budget of 0.0 s spent"}
    assert w == {"mhim_speed": skipped, "ddp": skipped}
