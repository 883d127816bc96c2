"""Epoch time and peak memory of MHIM(head) against the plain head, in one process.

MHIM should cost less than its base head: the teacher scores the full bag in
inference mode (no autograd graph) and the student trains on the kept instances
only. Both variants run through the shared loop (``tiahnm.training.loop.fit``) on the
same synthetic Camelyon16-sized bags, interleaved epoch by epoch (plain, mhim, plain,
mhim ...) so machine load hits both alike; the ratio of median epoch times is
reported. Peak memory is measured per variant in a fresh child process: on CPU the
growth of the resident set over one epoch (the kernel's high-water mark ``VmHWM``,
reset through ``/proc/self/clear_refs`` after the bags are built); on CUDA
``torch.cuda.max_memory_allocated``.

Targets (issue #10): MHIM(AB-MIL) <= 0.95x plain AB-MIL, MHIM(TransMIL) <= 0.5x plain
TransMIL, peak memory not above the base head's.

Usage::

    python benchmarks/mhim_speed.py --n-bags 8 --n-instances 8000 --dim 1024 \
        --out benchmarks/results/mhim_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from loop_overhead import build, make_bags

from tiahnm.utils.provenance import write_result

PRESET = {"abmil": "c16_abmil", "transmil": "c16_transmil", "dsmil": "c16_dsmil"}


def epoch(head, bags, device: torch.device, mhim: bool, head_name: str) -> float:
    """One epoch of the shared loop (no validation, no checkpoints)."""
    from tiahnm.config import TrainConfig
    from tiahnm.plugins import get_registry
    from tiahnm.training.loop import fit

    miner = (
        get_registry("miner").create("mhim", preset=PRESET[head_name]) if mhim else None
    )
    cfg = TrainConfig(epochs=1, scheduler="none", progress=False, amp="off")
    t0 = time.perf_counter()
    fit(head, bags, [], cfg, miner=miner, device=device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_pair(args: argparse.Namespace, head_name: str) -> dict:
    """Interleaved epoch times of plain and MHIM."""
    device = torch.device(args.device)
    bags = make_bags(args.n_bags, args.n_instances, args.dim)
    plain_head = build(head_name, args.dim)
    mhim_head = build(head_name, args.dim)
    epoch(plain_head, bags[:1], device, False, head_name)  # warm-up
    epoch(mhim_head, bags[:1], device, True, head_name)
    plain, mhim = [], []
    for _ in range(args.epochs):
        plain.append(epoch(plain_head, bags, device, False, head_name))
        mhim.append(epoch(mhim_head, bags, device, True, head_name))
    p, m = statistics.median(plain), statistics.median(mhim)
    return {
        "plain_epoch_s": p,
        "mhim_epoch_s": m,
        "ratio": m / p,
        "plain_all": plain,
        "mhim_all": mhim,
    }


CHILD = """
import sys, torch
sys.path.insert(0, {here!r})
import memprobe, mhim_speed as ms
device = torch.device({device!r})
bags = ms.make_bags({n_bags}, {n_instances}, {dim})
head = ms.build({head!r}, {dim})
ms.epoch(head, bags[:1], device, {mhim!r}, {head!r})  # warm-up, not measured
head = ms.build({head!r}, {dim})
with memprobe.Peak(device) as peak:
    ms.epoch(head, bags, device, {mhim!r}, {head!r})
print(peak.mb)
"""


def peak_memory(args: argparse.Namespace, head_name: str, mhim: bool) -> float:
    """Peak memory growth (MiB) over one epoch, in a fresh child process."""
    code = CHILD.format(
        here=str(Path(__file__).parent),
        device=args.device,
        n_bags=args.n_bags,
        n_instances=args.n_instances,
        dim=args.dim,
        head=head_name,
        mhim=mhim,
    )
    cmd = [sys.executable, "-c", code]
    if args.threads:
        cmd = [
            sys.executable,
            "-c",
            f"import torch; torch.set_num_threads({args.threads})\n{code}",
        ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the benchmark and write JSON."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--heads", nargs="+", default=["abmil", "transmil"])
    p.add_argument("--n-bags", type=int, default=8)
    p.add_argument("--n-instances", type=int, default=8000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/mhim_speed.json")
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for head in args.heads:
        row = {"head": head, "preset": PRESET[head], **time_pair(args, head)}
        if not args.no_memory:
            row["plain_peak_mib"] = peak_memory(args, head, False)
            row["mhim_peak_mib"] = peak_memory(args, head, True)
        rows.append(row)
        print(
            json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}),
            flush=True,
        )
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    payload = {
        "device": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_bags": args.n_bags,
        "n_instances": args.n_instances,
        "dim": args.dim,
        "epochs": args.epochs,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, payload)


if __name__ == "__main__":
    main()
