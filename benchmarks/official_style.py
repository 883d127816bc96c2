"""The shared loop against the algorithm written as plainly as the official code does.

"Official style" is the published algorithm written the way the reference
implementations train (a per-bag Python loop; written here from the papers, no code
copied): every bag logs ``loss.item()`` and its error, and for MHIM-MIL the teacher
scores the bag with autograd on (no ``inference_mode``), the hard instances come
from an ``argsort`` of the attention, the kept indices from a Python loop over the
instances, and the EMA teacher update from a Python loop over parameters that
allocates new tensors. Ours is ``tiahnm.training.loop.fit`` with the same head and
the same masking ratios (``mhim`` miner, constant beta_h). Epochs are interleaved
(an official-style epoch runs in the ``on_epoch_end`` callback of one long ``fit``); ``ratio`` is official / ours median epoch time
(> 1: ours is faster). Peak memory per variant comes from a fresh child process as
in ``loop_overhead.py``.

Usage::

    python benchmarks/official_style.py --n-bags 20 --n-instances 8000 --dim 1024 \
        --rows abmil:none abmil:mhim dsmil:none --out benchmarks/results/official_style_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from loop_overhead import build, make_bags, peak_memory, warm_up  # noqa: F401

from tiahnm.utils.provenance import write_result

#: MHIM masking ratios shared by both variants (the paper's C16 AB-MIL setting with
#: a constant beta_h so that both sides mask the same number of instances).
MHIM = {
    "mask_ratio_h": 0.01,
    "mask_ratio_hr": 0.5,
    "mask_ratio_r": 0.5,
    "mask_h_schedule": "constant",
    "momentum": 0.9999,
    "consistency_weight": 0.1,
}


def official_setup(head, miner_name):
    """Optimiser and (for mhim) the teacher of the official-style loop."""
    opt = torch.optim.Adam(head.parameters(), lr=2e-4, weight_decay=1e-5)
    teacher = None
    if miner_name == "mhim":
        teacher = copy.deepcopy(head)
        for p in teacher.parameters():
            p.requires_grad = False
        teacher.eval()
    return opt, teacher


def official_mask(attn: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Kept indices: argsort, random subset of the top candidates, random masking."""
    n = attn.shape[-1]
    order = torch.argsort(attn.reshape(-1), descending=True)
    n_cand = math.ceil(n * MHIM["mask_ratio_h"] / MHIM["mask_ratio_hr"])
    n_high = math.ceil(n_cand * MHIM["mask_ratio_hr"])
    cand = order[:n_cand]
    high = cand[torch.randperm(n_cand, generator=generator)[:n_high]]
    masked = set(high.tolist())
    rest = [i for i in range(n) if i not in masked]
    n_rand = math.ceil(len(rest) * MHIM["mask_ratio_r"])
    perm = torch.randperm(len(rest), generator=generator)[:n_rand].tolist()
    masked.update(rest[i] for i in perm)
    keep = [i for i in range(n) if i not in masked]
    return torch.tensor(keep, dtype=torch.long)


def official_epoch(head, bags, opt, teacher, generator, device) -> float:
    """One epoch of the official-style per-bag loop."""
    head.train()
    t0 = time.perf_counter()
    train_loss, train_error = 0.0, 0.0
    for bag in bags:
        x = bag.features.to(device)
        y = torch.tensor([bag.label], device=device)
        if teacher is None:
            out = head(x)
            loss = head.loss(out, y)
        else:
            t_out = teacher(x)  # autograd on, as in the reference code
            keep = official_mask(t_out.attention.detach(), generator).to(device)
            out = head(x[keep])
            target = t_out.bag_embedding.detach()
            con = -(
                F.softmax(target / 0.1, dim=-1)
                * F.log_softmax(out.bag_embedding, dim=-1)
            ).sum(-1)
            loss = head.loss(out, y) + MHIM["consistency_weight"] * con.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if teacher is not None:
            m = MHIM["momentum"]
            for ps, pt in zip(head.parameters(), teacher.parameters(), strict=True):
                pt.data = pt.data * m + ps.data * (1.0 - m)
        train_loss += loss.item()
        pred = out.bag_logits.argmax(-1)
        train_error += 1.0 - pred.eq(y).float().mean().item()
    _ = (train_loss / len(bags), train_error / len(bags))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def ours_epoch(head, bags, device, miner_name) -> float:
    """One epoch of the shared loop with the same head and masking ratios."""
    from tiahnm.config import TrainConfig
    from tiahnm.miners.mhim import MHIMMiner
    from tiahnm.training.loop import fit

    miner = MHIMMiner(**MHIM) if miner_name == "mhim" else None
    cfg = TrainConfig(epochs=1, scheduler="none", progress=False, amp="off")
    t0 = time.perf_counter()
    fit(head, bags, [], cfg, miner=miner, device=device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def prepare_official(head, miner_name) -> None:
    """Nothing to import beforehand."""


def run_official(head, bags, device, miner_name) -> None:
    """One official-style epoch (memory probe)."""
    opt, teacher = official_setup(head, miner_name)
    official_epoch(head, bags, opt, teacher, torch.Generator().manual_seed(0), device)


def prepare_ours(head, miner_name) -> None:
    """Imports of the shared loop (outside the memory probe)."""
    import tiahnm.miners.mhim
    import tiahnm.training.loop
    import tiahnm.training.metrics  # noqa: F401


def run_ours(head, bags, device, miner_name) -> None:
    """One epoch of the shared loop (memory probe)."""
    ours_epoch(head, bags, device, miner_name)


def time_pair(args: argparse.Namespace, head_name: str, miner: str) -> dict:
    """Interleaved epoch times of the official-style loop and of ours.

    As in ``loop_overhead.py``: one ``fit`` of ``epochs + 1`` epochs whose
    ``on_epoch_end`` callback runs an official-style epoch; first epochs dropped.
    """
    from tiahnm.config import TrainConfig
    from tiahnm.miners.mhim import MHIMMiner
    from tiahnm.training.loop import fit

    device = torch.device(args.device)
    bags = make_bags(args.n_bags, args.n_instances, args.dim)
    off_head = build(head_name, args.dim).to(device)
    our_head = build(head_name, args.dim).to(device)
    opt, teacher = official_setup(off_head, miner)
    gen = torch.Generator().manual_seed(0)
    off: list[float] = []
    ours: list[float] = []
    clock = [0.0]

    def on_epoch_end(row: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        ours.append(time.perf_counter() - clock[0])
        off.append(official_epoch(off_head, bags, opt, teacher, gen, device))
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
        miner=MHIMMiner(**MHIM) if miner == "mhim" else None,
        device=device,
        seed=0,
        on_epoch_end=on_epoch_end,
    )
    off, ours = off[1:], ours[1:]
    o, r = statistics.median(off), statistics.median(ours)
    return {
        "official_epoch_s": o,
        "ours_epoch_s": r,
        "ratio_official_over_ours": o / r,
        "official_all": off,
        "ours_all": ours,
    }


def main() -> None:
    """Run the comparison and write JSON."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--rows",
        nargs="+",
        default=["abmil:none", "abmil:mhim", "dsmil:none"],
        help="head:miner pairs (miner: none or mhim).",
    )
    p.add_argument("--n-bags", type=int, default=20)
    p.add_argument("--n-instances", type=int, default=8000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/official_style.json")
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spec in args.rows:
        head, _, miner = spec.partition(":")
        miner = miner or "none"
        row = {"head": head, "miner": miner, **time_pair(args, head, miner)}
        if not args.no_memory:
            for variant in ("official", "ours"):
                row[f"{variant}_peak_mb"] = peak_memory(
                    args, head, miner, variant, module="official_style"
                )
        rows.append(row)
        print(
            json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}),
            flush=True,
        )
    payload = {
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_bags": args.n_bags,
        "n_instances": args.n_instances,
        "dim": args.dim,
        "epochs": args.epochs,
        "mhim_options": MHIM,
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, payload)


if __name__ == "__main__":
    main()
