"""Overhead of the shared training loop against a minimal PyTorch loop.

For each head (and optionally a miner), the same bags are trained for the same number
of epochs by (a) ``tiahnm.training.loop.fit`` and (b) a reference loop that does only
``forward -> head.loss -> backward -> Adam step`` per bag. Both run in this process,
interleaved (ref, ours, ref, ours ...) so machine load affects both alike; the ratio of
median epoch times is the loop's overhead (target <= 1.10). Peak memory is measured per
variant in a child process (CPU: peak RSS growth; CUDA: ``max_memory_allocated``).

Usage::

    python benchmarks/loop_overhead.py --n-bags 20 --n-instances 8000 --dim 1024 \
        --heads abmil dsmil --out benchmarks/results/loop_overhead_cpu.json
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


def make_bags(n_bags: int, n_instances: int, dim: int, seed: int = 0) -> list:
    """Synthetic bags of Camelyon16 size (features only; labels alternate)."""
    from tiahnm.data.bag import Bag

    g = torch.Generator().manual_seed(seed)
    return [
        Bag(f"b{i}", i % 2, torch.randn(n_instances, dim, generator=g))
        for i in range(n_bags)
    ]


def build(head_name: str, dim: int) -> torch.nn.Module:
    """A head from the registry with its default options."""
    from tiahnm.plugins import get_registry

    torch.manual_seed(0)
    return get_registry("head").create(head_name, dim, 2)


def reference_epoch(head, bags, opt, device) -> float:
    """The minimal loop: one Adam step per bag, nothing else."""
    head.train()
    t0 = time.perf_counter()
    for bag in bags:
        x = bag.features.to(device)
        y = torch.tensor([bag.label], device=device)
        out = head(x, label=y if head.needs_label_in_forward else None)
        loss = head.loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def ours_epoch(head, bags, device, miner_name: str | None) -> float:
    """One epoch of the shared loop (no validation set, no checkpointing)."""
    from tiahnm.config import TrainConfig
    from tiahnm.plugins import get_registry
    from tiahnm.training.loop import fit

    miner = get_registry("miner").create(miner_name) if miner_name else None
    cfg = TrainConfig(epochs=1, scheduler="none", progress=False, amp="off")
    t0 = time.perf_counter()
    fit(head, bags, [], cfg, miner=miner, device=device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_pair(args: argparse.Namespace, head_name: str, miner: str | None) -> dict:
    """Interleaved epoch times of the reference loop and of ours."""
    device = torch.device(args.device)
    bags = make_bags(args.n_bags, args.n_instances, args.dim)
    ref_head = build(head_name, args.dim).to(device)
    our_head = build(head_name, args.dim).to(device)
    opt = torch.optim.Adam(ref_head.parameters(), lr=2e-4, weight_decay=1e-5)
    reference_epoch(ref_head, bags[:2], opt, device)  # warm-up
    ours_epoch(our_head, bags[:2], device, miner)
    ref, ours = [], []
    for _ in range(args.epochs):
        ref.append(reference_epoch(ref_head, bags, opt, device))
        ours.append(ours_epoch(our_head, bags, device, miner))
    r, o = statistics.median(ref), statistics.median(ours)
    return {
        "reference_epoch_s": r,
        "ours_epoch_s": o,
        "ratio": o / r,
        "ref_all": ref,
        "ours_all": ours,
    }


def peak_memory(
    args: argparse.Namespace, head_name: str, miner: str | None, variant: str
) -> float:
    """Peak memory (MB) of one epoch of ``variant`` in a fresh child process."""
    code = f"""
import resource, sys, torch
sys.argv = ['x']
sys.path.insert(0, {str(Path(__file__).parent)!r})
import loop_overhead as lo
device = torch.device({args.device!r})
bags = lo.make_bags({args.n_bags}, {args.n_instances}, {args.dim})
head = lo.build({head_name!r}, {args.dim}).to(device)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
if {variant!r} == 'reference':
    opt = torch.optim.Adam(head.parameters(), lr=2e-4)
    lo.reference_epoch(head, bags, opt, device)
else:
    lo.ours_epoch(head, bags, device, {miner!r})
if device.type == 'cuda':
    print(torch.cuda.max_memory_allocated() / 2**20)
else:
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the benchmark and write JSON."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--heads",
        nargs="+",
        default=["abmil", "abmil_gated", "dsmil", "clam_sb", "dtfd", "mean_pool"],
    )
    p.add_argument(
        "--miner", default=None, help="Miner for our loop (the reference has none)."
    )
    p.add_argument("--n-bags", type=int, default=20)
    p.add_argument("--n-instances", type=int, default=8000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/loop_overhead.json")
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for head in args.heads:
        row = {
            "head": head,
            "miner": args.miner or "none",
            **time_pair(args, head, args.miner),
        }
        if not args.no_memory:
            row["reference_peak_mb"] = peak_memory(args, head, None, "reference")
            row["ours_peak_mb"] = peak_memory(args, head, args.miner, "ours")
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
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
