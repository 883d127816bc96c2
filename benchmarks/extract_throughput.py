"""Patch-feature throughput: ``tiahnm extract``'s pipeline vs TIAToolbox's engine.

Both run in one process on the same slide, with the same encoder module (small_cnn,
seeded random init; wrapped as a TIAToolbox ``ModelABC`` by
``tiahnm.encoders.tia_model.TIAEncoderModel`` for the engine) and the same patches:
ours are tiled (TIAToolbox grid + TIAToolbox masker, ``--min-tissue``) and the engine
is handed a mask at the target resolution that selects exactly those patches
(``masks=[ndarray]``); ``--masker none`` compares the full grid. The script checks
that both give the same coordinates and the same features.

One configuration per ``--masker`` x ``--num-workers`` (same worker count for both
pipelines). Timed per repeat (imports and encoder construction excluded, a first
warm-up run of each discarded, the two pipelines alternated so background load hits
both alike; medians reported):

* ours: open + tissue mask + tile + DataLoader read + encode + atomic HDF5 write
  (``Extractor.process``), split into tiling / read wait / model / write;
* engine: ``DeepFeatureExtractor(...)`` construction + ``run(patch_mode=False,
  output_type="zarr")`` with the precomputed mask, split into time inside
  ``infer_batch`` and the rest (reading, dask/zarr, engine overhead).

Also reported: reading alone (no model, in-process) through our dataset and through
TIAToolbox's ``WSIPatchDataset``.

Usage::

    python benchmarks/extract_throughput.py \
        --slide ../shared/data/slides/CMU-1-Small-Region.svs --repeats 3

``--vit-preset NAME`` measures something else (``bench_vit``): a named ViT preset
(random init) through ``Extractor.process`` in fp32 and under CPU bf16 autocast
(``torch.autocast("cpu", torch.bfloat16)``, set on the extractor here, in the
benchmark), the ratio of each to the encoder's forward-only throughput (preprocessing
+ forward on the same patches, already in memory), and the cosine similarity of the
bf16 features to the fp32 ones; written to ``--out`` (default
``benchmarks/results/extract_vit_bf16.json``)::

    python benchmarks/extract_throughput.py --vit-preset kaiko_vits16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tiahnm.utils.provenance import write_result

ROOT = Path(__file__).parents[1]
DEFAULT_SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    p.add_argument("--resolution", type=float, default=0.5)
    p.add_argument("--units", default="mpp")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument(
        "--masker",
        nargs="+",
        default=["otsu", "none"],
        choices=["otsu", "morphological", "none"],
        help="one configuration per masker x num-workers",
    )
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vit-preset", default=None, help="run bench_vit with this preset")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.out is None:
        name = "extract_vit_bf16.json" if args.vit_preset else "extract_throughput.json"
        args.out = ROOT / "benchmarks" / "results" / name
    return args


def _forward_rate(extractor, batch, dtype, batch_size: int) -> tuple[float, object]:
    """Patches/s of preprocessing + forward on in-memory patches, and the features."""
    import torch

    from tiahnm.runtime.device import autocast

    prep, module, out = extractor.encoder.preprocessing, extractor.module, []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(batch), batch_size):
            with autocast(extractor.device, dtype):
                out.append(module(prep(batch[i : i + batch_size])).float())
    return len(batch) / (time.perf_counter() - t0), torch.cat(out)


def bench_vit(args: argparse.Namespace, work: Path) -> dict:
    """fp32 vs bf16 autocast with a ViT preset: extraction, forward-only, cosine."""
    import torch

    from tiahnm.data.h5_features import read_feature_file
    from tiahnm.slides.dataset import SlidePatchDataset
    from tiahnm.slides.extract import ExtractConfig, Extractor
    from tiahnm.slides.reader import open_slide
    from tiahnm.slides.tiling import TilingConfig, tile_slide

    tiling_cfg = TilingConfig(
        resolution=args.resolution,
        units=args.units,
        patch_size=args.patch_size,
        masker=args.masker[0],
        min_tissue=args.min_tissue,
    )
    cfg = ExtractConfig(
        tiling=tiling_cfg,
        encoder=args.vit_preset,
        weights="random-init",
        batch_size=args.batch_size,
        num_workers=0,
        device="cpu",
        overwrite=True,
    )
    extractor = Extractor(cfg, work / "vit")
    slide = open_slide(args.slide, units=args.units)
    tiling = tile_slide(slide, tiling_cfg)
    ds = SlidePatchDataset(slide.source, tiling.bounds, args.resolution, args.units)
    patches = torch.from_numpy(np.stack([ds.read(i) for i in range(len(tiling))]))
    slide.close()
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in dtypes}
    feats: dict[str, np.ndarray] = {}
    for rep in range(args.repeats + 1):  # the first round is a warm-up
        for name, dtype in dtypes.items():
            extractor.amp_dtype = dtype
            t0 = time.perf_counter()
            res = extractor.process(args.slide)
            wall = time.perf_counter() - t0
            fwd, _ = _forward_rate(extractor, patches, dtype, args.batch_size)
            feats[name], _ = read_feature_file(res.output)
            if rep:
                runs[name].append(
                    {
                        "extract_patches_per_s": res.n_patches / wall,
                        "forward_patches_per_s": fwd,
                    }
                )
    a, b = torch.from_numpy(feats["fp32"]), torch.from_numpy(feats["bf16"])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    out: dict = {"preset": args.vit_preset, "patches": len(tiling)}
    for name in dtypes:
        ext = statistics.median(r["extract_patches_per_s"] for r in runs[name])
        fwd = statistics.median(r["forward_patches_per_s"] for r in runs[name])
        out[name] = {
            "extract_patches_per_s": round(ext, 2),
            "forward_only_patches_per_s": round(fwd, 2),
            "extract_over_forward": round(ext / fwd, 3),
        }
    out["bf16_over_fp32_extract"] = round(
        out["bf16"]["extract_patches_per_s"] / out["fp32"]["extract_patches_per_s"], 3
    )
    out["cosine_bf16_vs_fp32"] = {
        "mean": round(float(cos.mean()), 6),
        "min": round(float(cos.min()), 6),
    }
    out["runs"] = runs
    return out


def bench_one(args: argparse.Namespace, masker: str, workers: int, work: Path) -> dict:
    """One configuration: both pipelines on the same patches; medians over repeats."""
    from tiatoolbox.models.dataset import WSIPatchDataset
    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig

    from tiahnm.data.h5_features import read_feature_file
    from tiahnm.encoders.tia_model import TIAEncoderModel
    from tiahnm.slides.dataset import SlidePatchDataset
    from tiahnm.slides.extract import ExtractConfig, Extractor
    from tiahnm.slides.reader import open_slide
    from tiahnm.slides.tiling import TilingConfig, tile_slide

    tiling_cfg = TilingConfig(
        resolution=args.resolution,
        units=args.units,
        patch_size=args.patch_size,
        stride=args.stride,
        masker=masker,
        min_tissue=args.min_tissue,
    )
    cfg = ExtractConfig(
        tiling=tiling_cfg,
        encoder="small_cnn",
        batch_size=args.batch_size,
        num_workers=workers,
        device="cpu",
        overwrite=True,
    )
    tag = f"{masker}-w{workers}"
    extractor = Extractor(cfg, work / f"ours-{tag}")
    encoder = extractor.module  # the same module object for both pipelines

    # The patches ours keeps, as a mask at the target resolution for the engine.
    slide = open_slide(args.slide, units=args.units)
    tiling = tile_slide(slide, tiling_cfg)
    w, h = tiling.dimensions_at_resolution
    mask = np.zeros((h, w), dtype=np.uint8)
    for x0, y0, x1, y1 in tiling.bounds:
        mask[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] = 1
    n = len(tiling)

    # Reading alone (no model), in this process, both datasets, same patches.
    ds = SlidePatchDataset(slide.source, tiling.bounds, args.resolution, args.units)
    t0 = time.perf_counter()
    for i in range(n):
        ds.read(i)
    ours_read_only = n / (time.perf_counter() - t0)
    slide.close()
    eng_ds = WSIPatchDataset(
        input_img=args.slide,
        input_mask=mask,
        patch_input_shape=(args.patch_size, args.patch_size),
        stride_shape=(tiling_cfg.step, tiling_cfg.step),
        resolution=args.resolution,
        units=args.units,
        auto_get_mask=False,
        preproc_func=TIAEncoderModel.preproc,
    )
    t0 = time.perf_counter()
    for i in range(len(eng_ds)):
        eng_ds[i]
    engine_read_only = len(eng_ds) / (time.perf_counter() - t0)

    ioconfig = IOPatchPredictorConfig(
        input_resolutions=[{"units": args.units, "resolution": args.resolution}],
        patch_input_shape=(args.patch_size, args.patch_size),
        stride_shape=(tiling_cfg.step, tiling_cfg.step),
    )

    def run_ours() -> dict[str, float]:
        t = time.perf_counter()
        r = extractor.process(args.slide)
        total = time.perf_counter() - t
        assert r.status == "done" and r.n_patches == n, r
        return {
            "seconds": total,
            "tiling_s": r.tiling_s,
            "read_wait_s": r.read_s,
            "model_s": r.model_s,
            "write_s": r.write_s,
        }

    def run_engine() -> tuple[dict[str, float], Path]:
        model = TIAEncoderModel(encoder)
        t = time.perf_counter()
        engine = DeepFeatureExtractor(
            model=model,
            batch_size=args.batch_size,
            num_workers=workers,
            device="cpu",
            verbose=False,
        )
        out = engine.run(
            images=[args.slide],
            masks=[mask],
            patch_mode=False,
            ioconfig=ioconfig,
            save_dir=work / f"engine-{tag}",
            output_type="zarr",
            overwrite=True,
            auto_get_mask=False,
        )
        total = time.perf_counter() - t
        stats = {
            "seconds": total,
            "model_s": model.infer_seconds,
            "other_s": total - model.infer_seconds,
        }
        return stats, Path(next(iter(out.values())))

    # warm-up (discarded), then alternate so background load hits both alike
    run_ours()
    _, zarr_path = run_engine()
    ours_runs, engine_runs = [], []
    for _ in range(args.repeats):
        ours_runs.append(run_ours())
        engine_runs.append(run_engine()[0])

    # Same patches, same features?
    import zarr

    group = zarr.open_group(str(zarr_path), mode="r")
    eng_feats = np.asarray(group["features"])
    eng_coords = np.asarray(group["coordinates"])
    our_feats, _ = read_feature_file(extractor.output_path(args.slide.stem))
    order_e = np.lexsort((eng_coords[:, 0], eng_coords[:, 1]))
    order_o = np.lexsort((tiling.bounds[:, 0], tiling.bounds[:, 1]))
    same_coords = bool(np.array_equal(eng_coords[order_e], tiling.bounds[order_o]))
    max_diff = float(np.abs(eng_feats[order_e] - our_feats[order_o]).max())

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    ours_pps = n / med(ours_runs, "seconds")
    engine_pps = n / med(engine_runs, "seconds")
    return {
        "masker": masker,
        "num_workers": workers,
        "patches": n,
        "grid_patches": tiling.n_grid,
        "ours_patches_per_s": round(ours_pps, 2),
        "engine_patches_per_s": round(engine_pps, 2),
        "ratio_ours_over_engine": round(ours_pps / engine_pps, 3),
        "ours_median_s": {
            k: round(med(ours_runs, k), 3)
            for k in ("seconds", "tiling_s", "read_wait_s", "model_s", "write_s")
        },
        "engine_median_s": {
            k: round(med(engine_runs, k), 3) for k in ("seconds", "model_s", "other_s")
        },
        "reading_only_patches_per_s": {
            "ours": round(ours_read_only, 1),
            "engine_dataset": round(engine_read_only, 1),
        },
        "same_coordinates": same_coords,
        "max_abs_feature_diff": max_diff,
        "runs": {"ours": ours_runs, "engine": engine_runs},
    }


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t_import = time.perf_counter()
    import tiatoolbox
    from tiatoolbox import rcParam
    from tiatoolbox.models.engine import deep_feature_extractor  # noqa: F401
    from tiatoolbox.tools import tissuemask  # noqa: F401 - import cost outside timing

    import_s = time.perf_counter() - t_import
    rcParam["torch_compile_mode"] = "disable"  # CPU: the engine skips compile anyway

    work = Path(tempfile.mkdtemp(prefix="tiahnm-bench-"))
    if args.vit_preset:
        try:
            vit = bench_vit(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _write_vit(args, vit, import_s)
        return
    try:
        configs = [
            bench_one(args, masker, workers, work)
            for masker in args.masker
            for workers in args.num_workers
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "slide": args.slide.name,
        "settings": {
            "resolution": args.resolution,
            "units": args.units,
            "patch_size": args.patch_size,
            "stride": args.stride or args.patch_size,
            "min_tissue": args.min_tissue,
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "repeats": args.repeats,
            "encoder": "small_cnn (random init, seed 0), same module in both",
            "device": "cpu",
        },
        "configs": configs,
        "import_s": round(import_s, 2),
        "versions": {
            "tiatoolbox": tiatoolbox.__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)
    for c in configs:
        print(
            f"{c['masker']:>6} workers={c['num_workers']} patches={c['patches']}: "
            f"ours {c['ours_patches_per_s']} /s, engine {c['engine_patches_per_s']} /s, "
            f"ratio {c['ratio_ours_over_engine']}; ours {c['ours_median_s']}; "
            f"engine {c['engine_median_s']}; read-only {c['reading_only_patches_per_s']}; "
            f"same coords {c['same_coordinates']}, max diff {c['max_abs_feature_diff']}"
        )
    print(f"wrote {args.out}")


def _write_vit(args: argparse.Namespace, vit: dict, import_s: float) -> None:
    import tiatoolbox
    import torch

    from tiahnm.runtime.precision import cpu_bf16_support

    result = {
        "benchmark": "ViT preset extraction, fp32 vs CPU bf16 autocast",
        "slide": args.slide.name,
        "settings": {
            "resolution": args.resolution,
            "units": args.units,
            "patch_size": args.patch_size,
            "masker": args.masker[0],
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "repeats": args.repeats,
            "weights": "random-init (seed 0)",
        },
        **vit,
        "import_s": round(import_s, 2),
        "versions": {
            "tiatoolbox": tiatoolbox.__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "cpu_bf16": cpu_bf16_support(),
        },
    }
    write_result(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
