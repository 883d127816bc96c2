import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tiahnm.utils.provenance import git_commit, package_versions, write_result

ROOT = Path(__file__).parents[2]
# Benchmarks that write a JSON result (the others print or only read results).
JSON_BENCHMARKS = sorted(
    p for p in (ROOT / "benchmarks").glob("*.py") if ".json" in p.read_text()
)


def git(repo, *args):
    out = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def test_write_result_stamps_commit_versions_hardware_and_argv(tmp_path):
    out = write_result(
        tmp_path / "sub" / "r.json", {"speedup": 1.5}, argv=["b.py", "-x"]
    )
    data = json.loads(out.read_text())
    assert data["speedup"] == 1.5
    stamp = data["provenance"]
    assert stamp["argv"] == ["b.py", "-x"]
    assert torch.__version__.startswith(stamp["versions"]["torch"])
    assert stamp["hardware"]["torch_build"] == torch.__version__
    assert stamp["hardware"]["cpu_count"] >= 1
    assert stamp["hardware"]["torch_threads"] == torch.get_num_threads()
    assert stamp["commit"] == git(ROOT, "rev-parse", "HEAD")
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temp file left
    with pytest.raises(ValueError, match="provenance"):
        write_result(tmp_path / "x.json", {"provenance": 1})


def test_git_commit_and_dirty_flag(tmp_path):
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}
    git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("a")
    git(tmp_path, "add", "f")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert git_commit(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f").write_text("b")
    assert git_commit(tmp_path) == {"commit": head, "dirty": True}


def test_package_versions_marks_missing():
    got = package_versions(["numpy", "no-such-package-xyz"])
    assert re.match(r"\d+\.\d+", got["numpy"])
    assert got["no-such-package-xyz"] is None


def test_benchmarks_found():
    assert len(JSON_BENCHMARKS) >= 5


@pytest.mark.parametrize("script", JSON_BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_writes_its_json_through_the_harness(script):
    text = script.read_text()
    assert "write_result(" in text, (
        f"{script.name} must write its JSON via write_result"
    )
    # no second way of writing a result file beside the harness
    assert "write_text(json.dumps(" not in text
    assert "write_json(" not in text
