"""Every GPU figure in one command: for the first few minutes a GPU is lent.

Workloads (each interleaves its variants in this process and reports medians and
ratios; peak memory is ``torch.cuda.max_memory_allocated`` growth around one epoch
or one pass, :mod:`memprobe`):

* ``loop_overhead``: per head, one epoch of the shared loop with AMP
  (``train.amp: auto``: bf16 where supported) against a minimal PyTorch loop under
  the same autocast (forward, loss, backward, Adam step per bag); ``ratio`` = ours /
  reference.
* ``mhim_speed``: MHIM(head) (its Camelyon16 preset) against the plain head, both
  through the shared loop with AMP; ``ratio`` = MHIM / plain.
* ``extraction``: :meth:`tiahnm.slides.extract.Extractor.encode` of in-memory uint8
  patches with a timm ViT (seeded random weights) against its forward-only limit
  (the same batches already preprocessed on the GPU, ``module(x)`` under the same
  autocast); ``fraction_of_forward`` = forward-only time / extraction time.
* ``compile``: heads trained eager and ``torch.compile``-d (dynamic shapes, the
  loop's :func:`~tiahnm.training.loop.compile_head`); the first compiled epoch
  (compilation) is reported apart from the steady epochs.
* ``ddp``: with two or more GPUs, ``torchrun --nproc-per-node 2`` of the shared loop
  (NCCL) against one process, same global step (``train.batch_size`` 2); otherwise
  recorded as skipped.

Without a CUDA device it refuses (exit 2) unless ``--dry-run``: then every workload
runs tiny on the CPU (gloo for DDP, the ``eager`` compile backend) and the JSON is
written, so the suite itself is tested in CI. Workloads that would start after
``--budget-s`` seconds are recorded as skipped (the whole suite is sized for under 8
minutes on one GPU).

Usage::

    python benchmarks/gpu_suite.py --out benchmarks/results/gpu_suite.json
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu_suite_dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import memprobe  # noqa: E402
from loop_overhead import build, make_bags  # noqa: E402

HEADS = ("abmil", "abmil_gated", "dsmil", "transmil", "clam_sb", "dtfd", "mean_pool")
MHIM_PRESET = {"abmil": "c16_abmil", "transmil": "c16_transmil"}

#: Sizes of a real run and of ``--dry-run``.
SIZES = {
    "full": {
        "n_bags": 20,
        "n_instances": 8000,
        "dim": 1024,
        "epochs": 3,
        "heads": HEADS,
        "mhim_heads": ("abmil", "transmil"),
        "compile_heads": ("abmil", "transmil"),
        # named presets (ViT-S/16 and ViT-B/16 as kaiko.ai publish them), random init
        "vit": ("kaiko_vits16", "kaiko_vitb16"),
        "vit_options": {},
        "patch": 224,
        "n_patches": 1024,
        "extract_batch": 128,
        "extract_reps": 3,
    },
    "dry": {
        "n_bags": 3,
        "n_instances": 48,
        "dim": 32,
        "epochs": 1,
        "heads": HEADS,
        "mhim_heads": ("abmil",),
        "compile_heads": ("abmil",),
        # the same architecture, one block at 32 px (the generic timm path needs the
        # normalisation spelled out)
        "vit": ("timm:vit_small_patch16_224",),
        "vit_options": {
            "model_kwargs": {"img_size": 32, "depth": 1},
            "input_size": 32,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
        "patch": 32,
        "n_patches": 8,
        "extract_batch": 4,
        "extract_reps": 1,
    },
}


def sync(device: torch.device) -> None:
    """Wait for the device (timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_cfg(epochs: int, **kw: Any) -> Any:
    """The loop settings of every timed epoch: AMP auto, no schedule, no val."""
    from tiahnm.config import TrainConfig

    return TrainConfig(
        epochs=epochs, scheduler="none", progress=False, amp="auto", **kw
    )


def interleaved_fit(
    head: torch.nn.Module,
    bags: list,
    device: torch.device,
    epochs: int,
    between: Callable[[], float],
    miner: Any = None,
    **cfg: Any,
) -> tuple[list[float], list[float]]:
    """``fit`` for ``epochs + 1`` epochs, calling ``between`` after each epoch.

    Returns our epoch times and ``between``'s, the first (warm-up) epoch dropped.
    """
    from tiahnm.training.loop import fit

    ours: list[float] = []
    other: list[float] = []
    clock = [0.0]

    def on_epoch_end(_row: dict) -> None:
        sync(device)
        ours.append(time.perf_counter() - clock[0])
        other.append(between())
        clock[0] = time.perf_counter()

    clock[0] = time.perf_counter()
    fit(
        head,
        bags,
        [],
        train_cfg(epochs + 1, **cfg),
        miner=miner,
        device=device,
        seed=0,
        on_epoch_end=on_epoch_end,
    )
    return ours[1:], other[1:]


def reference_amp_epoch(head, bags, opt, device, dtype) -> float:
    """Minimal loop under autocast ``dtype``: forward, loss, backward, Adam, per bag."""
    from tiahnm.runtime.device import autocast

    head.train()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    t0 = time.perf_counter()
    for bag in bags:
        x = bag.features.to(device, non_blocking=True)
        y = torch.tensor([bag.label], device=device)
        with autocast(device, dtype):
            out = head(x, label=y if head.needs_label_in_forward else None)
            loss = head.loss(out, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sync(device)
    return time.perf_counter() - t0


def peak_epoch_mib(make: Callable[[], Any], device: torch.device) -> float:
    """Peak memory growth (MiB) of one call of ``make`` (one epoch or pass)."""
    with memprobe.Peak(device) as peak:
        make()
        sync(device)
    return peak.mb


def _one_epoch(head, bags, device, miner=None, **cfg) -> Callable[[], Any]:
    from tiahnm.training.loop import fit

    return lambda: fit(
        head, bags, [], train_cfg(1, **cfg), miner=miner, device=device, seed=0
    )


def loop_overhead(s: dict, device: torch.device) -> list[dict]:
    """Shared loop with AMP vs a minimal AMP loop, per head."""
    from tiahnm.runtime.device import amp_dtype

    dtype = amp_dtype(device, "auto")
    bags = make_bags(s["n_bags"], s["n_instances"], s["dim"])
    rows = []
    for name in s["heads"]:
        ref_head = build(name, s["dim"]).to(device)
        opt = torch.optim.Adam(ref_head.parameters(), lr=2e-4, weight_decay=1e-5)
        ours, ref = interleaved_fit(
            build(name, s["dim"]),
            bags,
            device,
            s["epochs"],
            lambda h=ref_head, o=opt: reference_amp_epoch(h, bags, o, device, dtype),
        )
        o, r = statistics.median(ours), statistics.median(ref)
        peak = peak_epoch_mib(_one_epoch(build(name, s["dim"]), bags, device), device)
        rows.append(
            {
                "head": name,
                "amp": str(dtype).removeprefix("torch.") if dtype else "fp32",
                "ours_epoch_s": o,
                "reference_epoch_s": r,
                "ratio": o / r,
                "ours_all": ours,
                "reference_all": ref,
                "ours_peak_mib": peak,
            }
        )
    return rows


def mhim_speed(s: dict, device: torch.device) -> list[dict]:
    """MHIM(head) vs the plain head through the shared loop with AMP."""
    from tiahnm.plugins import get_registry

    bags = make_bags(s["n_bags"], s["n_instances"], s["dim"])
    rows = []
    for name in s["mhim_heads"]:

        def miner(n: str = name) -> Any:
            return get_registry("miner").create("mhim", preset=MHIM_PRESET[n])

        plain_head = build(name, s["dim"]).to(device)
        plain_epoch = _one_epoch(plain_head, bags, device)

        def plain(f: Callable[[], Any] = plain_epoch) -> float:
            t0 = time.perf_counter()
            f()
            sync(device)
            return time.perf_counter() - t0

        mhim, base = interleaved_fit(
            build(name, s["dim"]), bags, device, s["epochs"], plain, miner=miner()
        )
        m, p = statistics.median(mhim), statistics.median(base)
        rows.append(
            {
                "head": name,
                "preset": MHIM_PRESET[name],
                "plain_epoch_s": p,
                "mhim_epoch_s": m,
                "ratio": m / p,
                "plain_all": base,
                "mhim_all": mhim,
                "plain_peak_mib": peak_epoch_mib(
                    _one_epoch(build(name, s["dim"]), bags, device), device
                ),
                "mhim_peak_mib": peak_epoch_mib(
                    _one_epoch(build(name, s["dim"]), bags, device, miner()), device
                ),
            }
        )
    return rows


class Patches(torch.utils.data.Dataset):
    """Seeded random uint8 HWC patches (the reading is not what is measured)."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, 256, (n, size, size, 3), generator=g).to(
            torch.uint8
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def extraction(s: dict, device: torch.device) -> list[dict]:
    """``Extractor.encode`` vs the forward-only limit, per ViT."""
    from tiahnm.encoders.base import pool_output
    from tiahnm.runtime.device import autocast
    from tiahnm.slides.extract import ExtractConfig, Extractor
    from tiahnm.slides.tiling import TilingConfig

    data = Patches(s["n_patches"], s["patch"])
    rows = []
    for model in s["vit"]:
        with tempfile.TemporaryDirectory() as tmp:
            ext = Extractor(
                ExtractConfig(
                    tiling=TilingConfig(patch_size=s["patch"]),
                    encoder=model,
                    weights="random-init",
                    encoder_options=s["vit_options"],
                    batch_size=s["extract_batch"],
                    device=device.type,
                    num_workers=0 if device.type == "cpu" else None,
                ),
                tmp,
            )
        bs = s["extract_batch"]
        prepped = [
            ext.encoder.preprocessing(data.data[i : i + bs].to(device))
            for i in range(0, len(data), bs)
        ]

        def forward_only(e: Any = ext, xs: list = prepped) -> float:
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for x in xs:
                    with autocast(device, e.amp_dtype):
                        pool_output(e.module(x)).float()
            sync(device)
            return time.perf_counter() - t0

        def encode(e: Any = ext) -> float:
            t0 = time.perf_counter()
            e.encode(data)
            return time.perf_counter() - t0

        forward_only(), encode()  # warm-up (kernel selection, allocator)
        fwd, enc = [], []
        for _ in range(s["extract_reps"]):
            fwd.append(forward_only())
            enc.append(encode())
        f, e = statistics.median(fwd), statistics.median(enc)
        rows.append(
            {
                "encoder": model,
                "precision": ext.settings["precision"],
                "n_patches": len(data),
                "batch_size": bs,
                "extract_s": e,
                "forward_only_s": f,
                "extract_patches_per_s": len(data) / e,
                "forward_only_patches_per_s": len(data) / f,
                "fraction_of_forward": f / e,
                "extract_peak_mib": peak_epoch_mib(
                    lambda x=ext: x.encode(data), device
                ),
            }
        )
        del ext, prepped
    return rows


def compile_compare(s: dict, device: torch.device, backend: str) -> list[dict]:
    """Eager vs ``torch.compile`` (dynamic shapes) epochs, per head."""
    from tiahnm.training.loop import compile_head

    bags = make_bags(s["n_bags"], s["n_instances"], s["dim"])
    rows = []
    for name in s["compile_heads"]:
        eager_head = build(name, s["dim"]).to(device)
        compiled = compile_head(build(name, s["dim"]).to(device), backend=backend)
        eager_epoch = _one_epoch(eager_head, bags, device)
        compiled_epoch = _one_epoch(compiled, bags, device)

        def timed(f: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            f()
            sync(device)
            return time.perf_counter() - t0

        first_compiled = timed(compiled_epoch)  # includes compilation
        timed(eager_epoch)
        eager, comp = [], []
        for _ in range(s["epochs"]):
            eager.append(timed(eager_epoch))
            comp.append(timed(compiled_epoch))
        e, c = statistics.median(eager), statistics.median(comp)
        rows.append(
            {
                "head": name,
                "backend": backend,
                "eager_epoch_s": e,
                "compiled_epoch_s": c,
                "speedup": e / c,
                "first_compiled_epoch_s": first_compiled,
                "eager_all": eager,
                "compiled_all": comp,
                "compiled_peak_mib": peak_epoch_mib(compiled_epoch, device),
                "eager_peak_mib": peak_epoch_mib(eager_epoch, device),
            }
        )
    return rows


def ddp_worker(args: argparse.Namespace) -> None:
    """One torchrun rank: time epochs of the shared loop, rank 0 writes the JSON."""
    from tiahnm.runtime.distributed import init_distributed, local_device
    from tiahnm.training.loop import fit

    s = SIZES["dry" if args.dry_run else "full"]
    ctx = init_distributed("cpu" if args.dry_run else "cuda")
    device = local_device(torch.device("cpu" if args.dry_run else "cuda"), ctx)
    bags = make_bags(s["n_bags"], s["n_instances"], s["dim"])
    times: list[float] = []
    clock = [time.perf_counter()]

    def on_epoch_end(_row: dict) -> None:
        sync(device)
        times.append(time.perf_counter() - clock[0])
        clock[0] = time.perf_counter()

    cfg = train_cfg(s["epochs"] + 1, batch_size=2)
    fit(
        build("abmil", s["dim"]),
        bags,
        [],
        cfg,
        device=device,
        seed=0,
        on_epoch_end=on_epoch_end,
        dist_ctx=ctx,
    )
    if ctx.is_main:
        backend = torch.distributed.get_backend()
        args.ddp_worker.write_text(
            json.dumps(
                {"epochs_s": times[1:], "backend": backend, "world": ctx.world_size}
            )
        )
    torch.distributed.destroy_process_group()


def ddp(s: dict, device: torch.device, args: argparse.Namespace) -> dict:
    """Two torchrun ranks vs one process, the same global steps."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, found {torch.cuda.device_count()}"}
    from tiahnm.training.loop import fit

    bags = make_bags(s["n_bags"], s["n_instances"], s["dim"])
    one: list[float] = []
    clock = [time.perf_counter()]

    def on_epoch_end(_row: dict) -> None:
        sync(device)
        one.append(time.perf_counter() - clock[0])
        clock[0] = time.perf_counter()

    fit(
        build("abmil", s["dim"]),
        bags,
        [],
        train_cfg(s["epochs"] + 1, batch_size=2),
        device=device,
        seed=0,
        on_epoch_end=on_epoch_end,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            str(Path(__file__).resolve()),
            "--ddp-worker",
            str(out),
            *(["--dry-run"] if args.dry_run else []),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", TIAHNM_NO_PROGRESS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return {"failed": proc.stderr[-2000:], "command": " ".join(cmd)}
        res = json.loads(out.read_text())
    single = statistics.median(one[1:])
    two = statistics.median(res["epochs_s"])
    return {
        "backend": res["backend"],
        "world_size": res["world"],
        "single_epoch_s": single,
        "ddp_epoch_s": two,
        "speedup": single / two,
        "single_all": one[1:],
        "ddp_all": res["epochs_s"],
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Commit, versions, hardware and argv."""

    def git(*cmd: str) -> str:
        out = subprocess.run(
            ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    hw: dict[str, Any] = {"cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            cuda=torch.version.cuda,
        )
    return {
        "dry_run": args.dry_run,
        "device": str(device),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "hardware": hw,
        "threads": torch.get_num_threads(),
        "argv": [sys.executable, *sys.argv],
        "memory_method": "cuda.max_memory_allocated growth"
        if device.type == "cuda"
        else "VmHWM growth (CPU dry run)",
    }


def run_suite(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every workload within the time budget; a failing one is recorded, not fatal."""
    s = SIZES["dry" if args.dry_run else "full"]
    backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    jobs: dict[str, Callable[[], Any]] = {
        "loop_overhead": lambda: loop_overhead(s, device),
        "mhim_speed": lambda: mhim_speed(s, device),
        "extraction": lambda: extraction(s, device),
        "compile": lambda: compile_compare(s, device, backend),
        "ddp": lambda: ddp(s, device, args),
    }
    payload = environment(device, args)
    payload["sizes"] = {k: v for k, v in s.items() if not isinstance(v, tuple)}
    start = time.perf_counter()
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in args.workloads:
        if time.perf_counter() - start > args.budget_s:
            results[name] = {"skipped": f"time budget of {args.budget_s} s spent"}
            continue
        t0 = time.perf_counter()
        try:
            results[name] = jobs[name]()
        except (
            Exception
        ) as exc:  # record and go on: one broken path must not cost the rest
            results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)
    payload["workloads"] = results
    payload["workload_seconds"] = seconds
    payload["elapsed_s"] = time.perf_counter() - start
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu_suite.json")
    p.add_argument("--dry-run", action="store_true", help="tiny, on CPU (CI)")
    p.add_argument(
        "--workloads",
        nargs="+",
        default=["loop_overhead", "mhim_speed", "extraction", "compile", "ddp"],
        choices=["loop_overhead", "mhim_speed", "extraction", "compile", "ddp"],
    )
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument(
        "--compile-backend", default=None, help="default inductor (eager dry)"
    )
    p.add_argument("--ddp-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 2 without a GPU (unless --dry-run)."""
    args = parse_args(argv)
    if args.ddp_worker is not None:
        ddp_worker(args)
        return 0
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny work: thread hand-offs would dominate
    elif not torch.cuda.is_available():
        print(
            "Error: gpu_suite needs a CUDA GPU (torch.cuda.is_available() is False); "
            "use --dry-run to run every workload tiny on the CPU.",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda")
    payload = run_suite(args, device)
    from tiahnm.utils.provenance import write_result

    write_result(args.out, payload)
    print(f"wrote {args.out} ({payload['elapsed_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
