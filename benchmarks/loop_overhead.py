"""Overhead of the shared training loop against a minimal PyTorch loop.

For each head (and optionally a miner), the same bags are trained for the same number
of epochs by (a) ``tiahnm.training.loop.fit`` and (b) a reference loop that does only
``forward -> head.loss -> backward -> Adam step`` per bag. Both run in this process,
interleaved (a reference epoch runs in the ``on_epoch_end`` callback of one long
``fit``), so machine load affects both alike; the ratio of median epoch times is the
loop's overhead (target <= 1.10). With a miner, the reference calls the miner's
``forward``/``after_step`` hooks itself. Peak memory is measured per variant in a
fresh child process (CPU: peak RSS growth over one epoch, after the data and the
model exist; CUDA: ``max_memory_allocated`` growth; see ``memprobe.py``).

Usage::

    python benchmarks/loop_overhead.py --n-bags 20 --n-instances 8000 --dim 1024 \
        --heads abmil dsmil --miners none mhim --out benchmarks/results/loop_overhead_cpu.json
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

from tiahnm.utils.provenance import write_result


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


def warm_up(head, dim: int, device: torch.device) -> None:
    """One forward/backward/Adam step of a small bag through a copy of ``head``."""
    import copy

    h = copy.deepcopy(head)
    x = torch.randn(64, dim, device=device)
    out = h(x, label=torch.tensor([0], device=device))
    h.loss(out, torch.tensor([0], device=device)).backward()
    opt = torch.optim.Adam(h.parameters())  # its first use imports more of torch
    opt.step()
    del h, x, out, opt


def make_miner(name: str | None):
    """A registered miner with its default options, or None."""
    from tiahnm.plugins import get_registry

    return get_registry("miner").create(name) if name else None


def reference_epoch(head, bags, opt, device, miner=None, ctx=None, step0=0) -> float:
    """The minimal loop: per bag forward -> loss -> backward -> Adam step.

    With a miner, its ``forward`` and ``after_step`` hooks are called directly (the
    same mining work, none of the loop's machinery).
    """
    head.train()
    t0 = time.perf_counter()
    for i, bag in enumerate(bags):
        x = bag.features.to(device)
        y = torch.tensor([bag.label], device=device)
        if miner is None:
            out = head(x, label=y if head.needs_label_in_forward else None)
            loss = head.loss(out, y)
        else:
            out, extra = miner.forward(ctx, x, y, step0 + i)
            loss = head.loss(out, y) + sum(extra.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if miner is not None:
            miner.after_step(ctx, step0 + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def reference_setup(head, miner_name, device, n_bags):
    """Optimiser (and miner + context) of the reference loop."""
    from tiahnm.miners.base import FitContext

    miner = make_miner(miner_name)
    ctx = None
    params = list(head.parameters())
    if miner is not None:
        ctx = FitContext(head, device, epochs=1, steps_per_epoch=n_bags)
        ctx.generator = torch.Generator().manual_seed(0)
        miner.on_fit_start(ctx)
        for m in miner.modules().values():
            m.to(device)
            params += [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-4, weight_decay=1e-5)
    return opt, miner, ctx


def ours_epoch(head, bags, device, miner_name: str | None) -> float:
    """One epoch of the shared loop (no validation set, no checkpointing)."""
    from tiahnm.config import TrainConfig
    from tiahnm.training.loop import fit

    cfg = TrainConfig(epochs=1, scheduler="none", progress=False, amp="off")
    t0 = time.perf_counter()
    fit(head, bags, [], cfg, miner=make_miner(miner_name), device=device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def prepare_reference(head, miner_name) -> None:
    """Imports of the reference variant (outside the memory probe)."""
    import tiahnm.miners.base
    import tiahnm.plugins  # noqa: F401


def run_reference(head, bags, device, miner_name) -> None:
    """One reference epoch (memory probe)."""
    opt, miner, ctx = reference_setup(head, miner_name, device, len(bags))
    reference_epoch(head, bags, opt, device, miner, ctx)


def prepare_ours(head, miner_name) -> None:
    """Imports of the shared loop (outside the memory probe)."""
    import tiahnm.config
    import tiahnm.training.loop
    import tiahnm.training.metrics  # noqa: F401


def run_ours(head, bags, device, miner_name) -> None:
    """One epoch of the shared loop (memory probe)."""
    ours_epoch(head, bags, device, miner_name)


def time_pair(args: argparse.Namespace, head_name: str, miner: str | None) -> dict:
    """Interleaved epoch times of the reference loop and of ours.

    One ``fit`` call runs ``epochs + 1`` epochs; its ``on_epoch_end`` callback runs
    a reference epoch, so the two alternate (ours, reference, ours, ...) under the
    same machine load. Our epoch time is from the end of one callback to the start
    of the next (everything the loop does per epoch); the first epoch of each (set-up
    and warm-up) is dropped.
    """
    from tiahnm.config import TrainConfig
    from tiahnm.training.loop import fit

    device = torch.device(args.device)
    bags = make_bags(args.n_bags, args.n_instances, args.dim)
    ref_head = build(head_name, args.dim).to(device)
    our_head = build(head_name, args.dim).to(device)
    opt, ref_miner, ctx = reference_setup(ref_head, miner, device, len(bags))
    ref: list[float] = []
    ours: list[float] = []
    clock = [0.0]

    def on_epoch_end(row: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        ours.append(time.perf_counter() - clock[0])
        step0 = len(ref) * len(bags)
        ref.append(reference_epoch(ref_head, bags, opt, device, ref_miner, ctx, step0))
        clock[0] = time.perf_counter()

    cfg = TrainConfig(
        epochs=args.epochs + 1, scheduler="none", progress=False, amp="off"
    )
    clock[0] = time.perf_counter()
    fit(
        our_head,
        bags,
        [],
        cfg,
        miner=make_miner(miner),
        device=device,
        seed=0,
        on_epoch_end=on_epoch_end,
    )
    ref, ours = ref[1:], ours[1:]
    r, o = statistics.median(ref), statistics.median(ours)
    return {
        "reference_epoch_s": r,
        "ours_epoch_s": o,
        "ratio": o / r,
        "ref_all": ref,
        "ours_all": ours,
    }


PROBE = """
import sys, torch
sys.argv = ['x']
sys.path.insert(0, {bench_dir!r})
import memprobe, {module} as bench
torch.set_num_threads({threads})
device = torch.device({device!r})
bags = bench.make_bags({n_bags}, {n_instances}, {dim})
head = bench.build({head!r}, {dim}).to(device)
bench.prepare_{variant}(head, {miner!r})  # imports and one-off set-up, not measured
bench.warm_up(head, {dim}, device)  # torch's lazily created runtime buffers
with memprobe.Peak(device) as peak:
    bench.run_{variant}(head, bags, device, {miner!r})
print(peak.mb)
"""


def peak_memory(
    args: argparse.Namespace,
    head_name: str,
    miner: str | None,
    variant: str,
    module: str = "loop_overhead",
) -> float:
    """Peak memory (MB) of one epoch of ``variant`` in a fresh child process.

    CPU: growth of the resident set over the epoch (``VmHWM`` is reset after the
    data and the model exist, then compared with the RSS at that point); CUDA:
    ``torch.cuda.max_memory_allocated`` growth. See ``benchmarks/memprobe.py``.
    """
    code = PROBE.format(
        bench_dir=str(Path(__file__).parent),
        module=module,
        threads=torch.get_num_threads(),
        device=args.device,
        n_bags=args.n_bags,
        n_instances=args.n_instances,
        dim=args.dim,
        head=head_name,
        variant=variant,
        miner=miner,
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
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
        "--miners",
        nargs="+",
        default=["none"],
        help="Miners (none, mhim, ...): each head is timed with each miner; the "
        "reference calls the miner's hooks directly.",
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
        for miner_name in args.miners:
            miner = None if miner_name == "none" else miner_name
            row = {"head": head, "miner": miner_name, **time_pair(args, head, miner)}
            if not args.no_memory:
                row["reference_peak_mb"] = peak_memory(args, head, miner, "reference")
                row["ours_peak_mb"] = peak_memory(args, head, miner, "ours")
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
        "command": "python " + " ".join(sys.argv),
        "memory_method": "cuda.max_memory_allocated growth"
        if args.device.startswith("cuda")
        else "VmHWM growth (reset via /proc/self/clear_refs) over one epoch",
        "rows": rows,
    }
    write_result(args.out, payload)


if __name__ == "__main__":
    main()
