"""Stress run of issue 20: many small slides, some corrupt, ``tiahnm run`` SIGKILLed at
random moments during extraction and training and resumed each time.

The same ``tiahnm run`` config runs twice in subprocesses:

* **reference**: once, uninterrupted;
* **cut**: started, SIGKILLed at a random moment (``--kills-extract`` times when a
  random number of feature files exists, ``--kills-train`` times when a random fold is
  under way, plus a random delay of up to 50 ms during extraction and 1.5 s during
  training), and started again, until it finishes.

Then the outputs are compared: every feature file bit-identical (features and coords),
the same failures report listing exactly the corrupt slides, identical
``predictions.csv``, fold results and summary metrics, every good slide predicted,
no temporary file left, the output folder's lock released. The figures and checks
are written as JSON (``benchmarks/results/stress_kill_resume.json``).

Usage::

    python benchmarks/stress_kill_resume.py --slides 200 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=200)
    p.add_argument("--corrupt-fraction", type=float, default=0.05)
    p.add_argument("--kills-extract", type=int, default=3)
    p.add_argument("--kills-train", type=int, default=2)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--size", type=int, default=256, help="Slide side in pixels.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "stress_kill_resume.json",
    )
    return p.parse_args()


def draw_slide(size: int, label: int, rng: np.random.Generator) -> np.ndarray:
    """Background with a pink tissue block; positive slides hold a dark nest."""
    img = np.full((size, size, 3), 238, dtype=np.int16)
    x0, x1 = size // 8, size - size // 8
    img[x0:x1, x0:x1] = np.array([190, 110, 160]) + rng.integers(
        -25, 25, size=(x1 - x0, x1 - x0, 3)
    )
    if label:
        c = int(rng.integers(x0 + 16, x1 - 48))
        img[c : c + 32, c : c + 32] = np.array([90, 40, 110])
    return np.clip(img, 0, 255).astype(np.uint8)


def make_cohort(root: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Slides, labels CSV and the run config; returns the config and corrupt ids."""
    from tiahnm.demo.slides import write_pyramid_tiff

    rng = np.random.default_rng(args.seed)
    slides = root / "slides"
    slides.mkdir(parents=True)
    n_bad = round(args.corrupt_fraction * args.slides)
    bad = set(rng.choice(args.slides, size=n_bad, replace=False).tolist())
    corrupt = []
    for i in range(args.slides):
        sid, label = f"slide{i:03d}", i % 2
        path = slides / f"{sid}.tif"
        write_pyramid_tiff(path, draw_slide(args.size, label, rng), mpp=0.5, levels=1)
        if i in bad:  # three kinds of damage, in turn
            kind = len(corrupt) % 3
            data = path.read_bytes()
            if kind == 0:
                path.write_bytes(rng.bytes(len(data)))
            elif kind == 1:
                path.write_bytes(data[: len(data) // 2])
            else:
                path.write_bytes(b"")
            corrupt.append(sid)
    labels = root / "labels.csv"
    labels.write_text(
        "slide_id,label\n"
        + "".join(f"slide{i:03d},{i % 2}\n" for i in range(args.slides))
    )
    config = root / "run.yaml"
    config.write_text(
        f"""
extract:
  slides: [{slides}]
  resolution: 0.5
  patch_size: 64
  num_workers: 0
  batch_size: 32
data:
  source: h5_folder
  options: {{labels_csv: {labels}}}
head: {{name: abmil, options: {{embed_dim: 16}}}}
train: {{epochs: {args.epochs}, patience: 100, num_threads: 1, progress: false}}
cv: {{folds: {args.folds}}}
evaluation: {{bootstrap: 200}}
"""
    )
    return config, sorted(corrupt)


def command(config: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tiahnm",
        "run",
        str(config),
        "--output-path",
        str(out),
    ]


def env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        TIAHNM_NO_PROGRESS="1",
        OMP_NUM_THREADS="1",
        TIAHNM_DISABLE_PLUGIN_AUTOLOAD="1",
    )


def run_to_end(config: Path, out: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    res = subprocess.run(
        command(config, out), env=env(), capture_output=True, text=True
    )
    return res.returncode, time.perf_counter() - t0


def progress(out: Path) -> dict[str, int]:
    feats = out / "features"
    return {
        "feature_files": len(list(feats.glob("*.h5"))) if feats.is_dir() else 0,
        "folds_done": len(list((out / "folds").glob("*/result.json"))),
        "folds_started": len(list((out / "folds").glob("*"))),
    }


def kill_when(
    config: Path,
    out: Path,
    ready: Any,
    rng: np.random.Generator,
    max_delay: float = 0.05,
) -> dict[str, Any]:
    """Start the run, SIGKILL it once ``ready(out)`` holds (+ a random delay)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command(config, out),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and not ready(out):
        time.sleep(0.005)
    delay = float(rng.uniform(0, max_delay))
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return {
        "killed": not finished,
        "returncode": proc.returncode,
        "seconds_into_run": round(time.perf_counter() - t0, 2),
        "delay_after_ready_s": round(delay, 3),
        "at": progress(out),
    }


def read_features(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import h5py

    out = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path) as f:
            out[path.stem] = (f["features"][()], f["coords"][()])
    return out


def failures(folder: Path) -> dict[str, str]:
    with (folder / "failures.csv").open(newline="") as fh:
        return {Path(r["slide"]).stem: r["error"] for r in csv.DictReader(fh)}


def fold_results(out: Path) -> dict[str, Any]:
    res = {}
    for p in sorted((out / "folds").glob("*/result.json")):
        r = json.loads(p.read_text())
        res[p.parent.name] = {
            k: r[k] for k in ("metrics", "predictions", "best_epoch", "threshold")
        }
    return res


def compare(ref: Path, cut: Path, corrupt: list[str], n_slides: int) -> dict[str, Any]:
    fa, fb = read_features(ref / "features"), read_features(cut / "features")
    same_features = sorted(fa) == sorted(fb) and all(
        np.array_equal(fa[k][0], fb[k][0]) and np.array_equal(fa[k][1], fb[k][1])
        for k in fa
    )
    fail_ref, fail_cut = failures(ref / "features"), failures(cut / "features")
    predicted = [
        row["slide_id"]
        for row in csv.DictReader((cut / "predictions.csv").open(newline=""))
    ]
    good = {f"slide{i:03d}" for i in range(n_slides)} - set(corrupt)
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((cut / "summary.json").read_text())
    lock = cut / ".tiahnm.lock"
    checks = {
        "feature_files_bit_identical": same_features,
        "n_feature_files": len(fb),
        "failures_report_complete": sorted(fail_cut) == corrupt,
        "failures_report_same_as_reference": fail_cut == fail_ref,
        "predictions_csv_identical": (ref / "predictions.csv").read_text()
        == (cut / "predictions.csv").read_text(),
        "fold_results_identical": fold_results(ref) == fold_results(cut),
        "summary_metrics_identical": sa["metrics"] == sb["metrics"],
        "every_good_slide_predicted_once": sorted(predicted) == sorted(good),
        "no_temporary_files": not list(cut.rglob("*.tmp")),
        "lock_released": not lock.exists() or lock.read_text() == "",
        "report_written": (cut / "report.md").is_file(),
    }
    checks["all_ok"] = all(v for k, v in checks.items() if k != "n_feature_files")
    return checks


def git_commit() -> str:
    """HEAD, with ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD"], cwd=REPO, capture_output=True
        ).returncode
    except OSError:
        return "?"
    return head + ("-dirty" if dirty else "")


def main() -> None:
    args = parse_args()
    commit = git_commit()  # the code every run below uses
    rng = np.random.default_rng(args.seed + 1)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="tiahnm-stress-"))
    config, corrupt = make_cohort(root, args)
    n_good = args.slides - len(corrupt)

    code_ref, ref_s = run_to_end(config, root / "reference")
    print(f"reference: exit {code_ref} in {ref_s:.1f} s")

    cut = root / "cut"
    kills = []
    targets = sorted(
        rng.choice(np.arange(5, n_good - 5), args.kills_extract, replace=False)
    )
    for target in targets:
        kills.append(
            {"phase": "extract", "target_feature_files": int(target)}
            | kill_when(
                config, cut, lambda o, t=target: progress(o)["feature_files"] >= t, rng
            )
        )
        print("kill", kills[-1])
    folds = sorted(rng.choice(args.folds, args.kills_train, replace=False))
    for fold in folds:
        marker = f"r0_f{fold}"
        kills.append(
            {"phase": "train", "target_fold": marker}
            | kill_when(
                config,
                cut,
                lambda o, m=marker: (o / "folds" / m / "last.pt").is_file(),
                rng,
                max_delay=1.5,  # a random epoch of that fold
            )
        )
        print("kill", kills[-1])
    code_cut, last_s = run_to_end(config, cut)
    print(f"resumed: exit {code_cut} in {last_s:.1f} s")

    checks = compare(root / "reference", cut, corrupt, args.slides)
    checks["all_ok"] = checks["all_ok"] and all(k["killed"] for k in kills)
    import tiatoolbox
    import torch

    result = {
        "what": "tiahnm run killed with SIGKILL at random moments and resumed",
        "argv": sys.argv,
        "commit": commit,
        "settings": {
            "slides": args.slides,
            "corrupt": corrupt,
            "corrupt_kinds": "random bytes, TIFF cut in half, empty file (in turn)",
            "slide_px": args.size,
            "patch_size": 64,
            "encoder": "small_cnn (random init, seed 0)",
            "head": "abmil (embed_dim 16)",
            "folds": args.folds,
            "epochs": args.epochs,
            "seed": args.seed,
        },
        "exit_codes": {"reference": code_ref, "resumed_final": code_cut},
        "seconds": {
            "reference": round(ref_s, 1),
            "final_resumed_run": round(last_s, 1),
        },
        "kills": kills,
        "checks": checks,
        "versions": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "tiatoolbox": tiatoolbox.__version__,
            "numpy": np.__version__,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workdir": str(root),
    }
    from tiahnm.utils.provenance import write_result

    write_result(args.out, result)
    print(json.dumps(checks, indent=2))
    print(f"wrote {args.out}")
    sys.exit(0 if checks["all_ok"] else 1)


if __name__ == "__main__":
    main()
