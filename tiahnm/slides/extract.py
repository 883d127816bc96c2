"""Slides to per-slide feature files: tiling, reading, encoding, writing.

One encoder is built for the whole run (seeded, so a random-init encoder is the same
network in every run); each slide is then opened (:mod:`tiahnm.slides.reader`), tiled
(:mod:`tiahnm.slides.tiling`), read through a torch ``DataLoader`` with workers and
encoded in batches on the device (autocast bf16/fp16 on GPU), and written atomically to
``<output>/<slide_id>.h5`` (:mod:`tiahnm.slides.store`).

A slide whose file exists with the same settings is skipped. A slide that fails is
recorded with its reason and the others go on; ``failures.csv`` (slide, error) and
``extract_summary.json`` are written at the end.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the slides are sharded by slide id across the
processes (each on its own GPU, ``cuda:LOCAL_RANK``); rank 0 gathers every rank's
outcomes and writes the merged ``failures.csv`` and ``extract_summary.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.errors import ConfigError, DataError
from tiahnm.slides.reader import SLIDE_SUFFIXES, find_slides, open_slide, slide_id
from tiahnm.slides.tiling import TilingConfig, tile_slide

logger = logging.getLogger(__name__)

#: Version of the file layout written here (part of the skip check).
FORMAT_VERSION = 1
#: How messages name the CPU precision setting.
CPU_PRECISION_KEY = "extract.cpu_precision (--cpu-precision)"


@dataclass
class ExtractConfig:
    """Everything ``tiahnm extract`` needs besides the inputs and output folder.

    Attributes:
        tiling (TilingConfig): Resolution, patch size, stride, masker.
        encoder (str): Registered encoder, e.g. ``small_cnn``, ``torchvision:resnet50``.
        weights (str | None): Local weights file or ``random-init``.
        encoder_options (dict): Other encoder factory options.
        batch_size (int): Patches per forward pass.
        num_workers (int | None): DataLoader worker processes reading patches (0: one
            read-ahead thread in this process). None: 0 on CPU (the model already
            uses every core, the thread overlaps reading), else
            ``min(8, cpu_count - 1)``.
        device (str): ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``.
        amp (str): ``auto`` (bf16 if supported, else fp16, on GPU), ``bf16``,
            ``fp16`` or ``off``.
        cpu_precision (str): On CPU: ``fp32``, ``bf16`` or ``auto``
            (:mod:`tiahnm.runtime.precision`; the guard probes a synthetic batch).
        mpp (float | None): Level-0 mpp for slides without resolution metadata.
        power (float | None): Objective power for slides without it.
        seed (int): Seed of the encoder's random initialisation.
        annotations (str | None): Annotation file or folder of ``<slide_id>.<ext>``.
        min_overlap (float): Annotation overlap for a positive patch.
        annotation_classes (tuple[str, ...]): Classes/groups that count as positive
            (empty: all).
        overwrite (bool): Recompute slides already done.
        suffixes (tuple[str, ...]): File suffixes taken from input folders.
    """

    tiling: TilingConfig = field(default_factory=TilingConfig)
    encoder: str = "small_cnn"
    weights: str | None = None
    encoder_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    amp: str = "auto"
    cpu_precision: str = "fp32"
    mpp: float | None = None
    power: float | None = None
    seed: int = 0
    annotations: str | None = None
    min_overlap: float = 0.5
    annotation_classes: tuple[str, ...] = ()
    overwrite: bool = False
    suffixes: tuple[str, ...] = tuple(sorted(SLIDE_SUFFIXES))

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            msg = f"--batch-size must be positive, got {self.batch_size}."
            raise ConfigError(msg)
        if self.num_workers is not None and self.num_workers < 0:
            msg = f"--num-workers must be >= 0, got {self.num_workers}."
            raise ConfigError(msg)
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            msg = f"--amp must be auto, bf16, fp16 or off, got {self.amp!r}."
            raise ConfigError(msg)
        from tiahnm.runtime.precision import check_cpu_precision

        check_cpu_precision(self.cpu_precision, CPU_PRECISION_KEY)
        for name in ("mpp", "power"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                msg = f"--{name} must be positive, got {value}."
                raise ConfigError(msg)
        if not 0.0 <= self.min_overlap <= 1.0:
            msg = f"--min-overlap must be within [0, 1], got {self.min_overlap}."
            raise ConfigError(msg)


@dataclass
class SlideResult:
    """Outcome of one slide.

    Attributes:
        slide (str): Slide id.
        path (str): Input file.
        status (str): ``done``, ``skipped`` (already done) or ``failed``.
        n_patches (int): Patches encoded (or found in the existing file).
        n_grid (int): Patches in the full grid before the tissue filter (0 unknown).
        seconds (float): Wall time for this slide.
        tiling_s (float): Opening, masking and tiling.
        read_s (float): Time the encoder waited for patches (reading + decoding not
            hidden by the workers).
        model_s (float): Preprocessing and forward passes (synchronised).
        write_s (float): Writing the file.
        error (str): Why it failed.
        output (str): The feature file.
    """

    slide: str
    path: str
    status: str
    n_patches: int = 0
    n_grid: int = 0
    seconds: float = 0.0
    tiling_s: float = 0.0
    read_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    error: str = ""
    output: str = ""


@dataclass
class ExtractSummary:
    """Outcome of a run.

    Attributes:
        results (list[SlideResult]): One per input slide.
        seconds (float): Total wall time (encoder construction included).
        output_dir (str): Output folder.
        settings (dict): The settings recorded in every file.
        startup_s (float): Imports and encoder construction.
    """

    results: list[SlideResult]
    seconds: float
    output_dir: str
    settings: dict[str, Any]
    startup_s: float = 0.0

    def count(self, status: str) -> int:
        """Slides with ``status``."""
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[SlideResult]:
        """The failed slides."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def n_patches(self) -> int:
        """Patches encoded in this run."""
        return sum(r.n_patches for r in self.results if r.status == "done")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``extract_summary.json``)."""
        done = [r for r in self.results if r.status == "done"]
        encode_s = sum(r.seconds for r in done)
        return {
            "n_slides": len(self.results),
            "done": self.count("done"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "patches_encoded": self.n_patches,
            "seconds": round(self.seconds, 3),
            "startup_s": round(self.startup_s, 3),
            "patches_per_second": round(self.n_patches / encode_s, 2)
            if encode_s
            else None,
            "time_split_s": {
                "tiling": round(sum(r.tiling_s for r in done), 3),
                "read_wait": round(sum(r.read_s for r in done), 3),
                "model": round(sum(r.model_s for r in done), 3),
                "write": round(sum(r.write_s for r in done), 3),
            },
            "settings": self.settings,
            "slides": [asdict(r) for r in self.results],
        }


def resolve_workers(num_workers: int | None, device: Any) -> int:
    """``num_workers``, or for None: 0 on CPU, ``min(8, cpu_count - 1)`` otherwise."""
    if num_workers is not None:
        return num_workers
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _precision(device: Any, amp: str) -> tuple[Any, str]:
    from tiahnm.runtime.device import amp_dtype

    dtype = amp_dtype(device, amp)
    name = {None: "fp32"}.get(dtype) or str(dtype).removeprefix("torch.").replace(
        "bfloat16", "bf16"
    ).replace("float16", "fp16")
    return dtype, name


def run_settings(cfg: ExtractConfig, encoder: Any, precision: str) -> dict[str, Any]:
    """The settings that make two feature files comparable (the skip check).

    ``--mpp``/``--power`` are not part of it: they are compared per slide, and only
    for slides whose scale came from them. Package versions are recorded in the files
    but not compared (upgrading does not redo a cohort); :data:`FORMAT_VERSION` is
    bumped when tiahnm changes what it extracts.
    """
    return {
        "format": FORMAT_VERSION,
        "encoder": encoder.name,
        "encoder_options": encoder.options,
        "encoder_weights_sha256": encoder.weights_sha256,
        "encoder_state_sha256": encoder.state_sha256,
        "encoder_out_dim": encoder.out_dim,
        "preprocessing": encoder.preprocessing.as_dict(),
        **({"encoder_card": encoder.card} if encoder.card else {}),
        "precision": precision,
        "seed": cfg.seed,
        "tiling": cfg.tiling.as_dict(),
    }


def _settings_key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


class Extractor:
    """Encodes slides with one encoder and one set of settings.

    Args:
        cfg (ExtractConfig): The settings.
        output_dir (str | Path): Where ``<slide_id>.h5`` files go.

    Raises:
        ConfigError / PluginError / DataError: Bad settings or encoder (before any
            slide is touched).
    """

    def __init__(self, cfg: ExtractConfig, output_dir: str | Path) -> None:
        import importlib

        import torch

        from tiahnm.encoders.build import build_encoder

        # TIAToolbox's tools package takes ~10 s to import (registration, graph ...):
        # pay it here, not in the first slide's timing.
        for module in (
            "tiatoolbox.tools.patchextraction",
            "tiatoolbox.tools.tissuemask",
        ):
            importlib.import_module(module)

        self.cfg = cfg
        self.output_dir = Path(output_dir)
        from tiahnm.runtime.device import resolve_device
        from tiahnm.runtime.distributed import current, local_device

        self.device = local_device(resolve_device(cfg.device, "--device"), current())
        self.num_workers = resolve_workers(cfg.num_workers, self.device)
        self.amp_dtype, precision = _precision(self.device, cfg.amp)
        self.encoder = build_encoder(
            cfg.encoder,
            weights=cfg.weights,
            options=cfg.encoder_options,
            seed=cfg.seed,
        )
        # channels-last weights match the channels-last batches of Preprocessing
        self.module = (
            self.encoder.module.to(self.device)
            .to(memory_format=torch.channels_last)
            .eval()
        )
        if self.device.type == "cpu":
            self.amp_dtype, precision = self._cpu_precision()
        self.settings = run_settings(cfg, self.encoder, precision)
        self._key = _settings_key(self.settings)

    def _cpu_precision(self) -> tuple[Any, str]:
        """``cfg.cpu_precision`` resolved; ``auto`` probes a seeded synthetic batch."""
        import torch

        from tiahnm.encoders.base import pool_output
        from tiahnm.runtime.precision import resolve

        size = self.cfg.tiling.patch_size
        g = torch.Generator().manual_seed(self.cfg.seed)
        # smooth random colour fields: image-like statistics, no slide needed yet
        low = torch.rand(4, 3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
        batch = (img * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

        def probe(dtype: Any) -> Any:
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None),
            ):
                x = self.encoder.preprocessing(batch.to(self.device))
                return pool_output(self.module(x)).float()

        res = resolve(self.cfg.cpu_precision, self.device, CPU_PRECISION_KEY, probe)
        return res.dtype, res.name

    def output_path(self, sid: str) -> Path:
        """The feature file of slide ``sid``."""
        return self.output_dir / f"{sid}.h5"

    def is_done(self, sid: str) -> tuple[bool, dict[str, Any] | None]:
        """Whether ``sid`` has a readable file made with the same settings."""
        from tiahnm.slides.store import read_attrs

        attrs = read_attrs(self.output_path(sid))
        if attrs is None or self.cfg.overwrite:
            return False, attrs
        if attrs.get("settings") != self._key:
            return False, attrs
        # --mpp / --power matter only for slides that had to use them
        for name, source, given in (
            ("level0_mpp", "mpp_source", self.cfg.mpp),
            ("objective_power", "objective_power_source", self.cfg.power),
        ):
            if attrs.get(source) == "user" and attrs.get(name) != given:
                return False, attrs
        return True, attrs

    def loader_workers(self, n_patches: int) -> int:
        """Worker processes for a slide of ``n_patches``.

        A slide of at most one batch is read in this process (starting workers that
        each reopen the slide would cost more than they save); otherwise at most one
        worker per batch. Without workers, a background thread reads ahead.
        """
        if self.num_workers == 0 or n_patches <= self.cfg.batch_size:
            return 0
        return min(self.num_workers, -(-n_patches // self.cfg.batch_size))

    def encode(self, dataset: Any) -> tuple[np.ndarray, float, float]:
        """Features ``[N, D]`` of a patch dataset, and (read wait, model) seconds."""
        import torch
        from torch.utils.data import DataLoader

        from tiahnm.encoders.base import pool_output
        from tiahnm.runtime.device import autocast
        from tiahnm.slides.dataset import threaded_batches

        n, dim = len(dataset), self.encoder.out_dim
        out = np.empty((n, dim), dtype=np.float32)
        workers = self.loader_workers(n)
        pin = self.device.type == "cuda"
        if workers:
            loader: Any = DataLoader(
                dataset,
                batch_size=self.cfg.batch_size,
                shuffle=False,
                num_workers=workers,
                pin_memory=pin,
                prefetch_factor=4,
            )
        else:  # read ahead in a thread of this process (same patches, no fork)
            loader = threaded_batches(dataset, self.cfg.batch_size, pin_memory=pin)
        prep = self.encoder.preprocessing
        pos, read_s, model_s = 0, 0.0, 0.0
        it = iter(loader)
        with torch.inference_mode():
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                x = prep(batch.to(self.device, non_blocking=True))
                with autocast(self.device, self.amp_dtype):
                    feats = pool_output(self.module(x))
                feats = feats.float().cpu().numpy()
                model_s += time.perf_counter() - t1
                read_s += t1 - t0
                if feats.shape != (batch.shape[0], dim):
                    msg = (
                        f"encoder {self.encoder.name} gave features of shape "
                        f"{feats.shape}, expected ({batch.shape[0]}, {dim})."
                    )
                    raise DataError(msg)
                out[pos : pos + len(feats)] = feats
                pos += len(feats)
        if not np.isfinite(out).all():
            msg = (
                f"encoder {self.encoder.name} produced NaN/inf features "
                f"(precision {self.settings['precision']}; try --amp off or "
                "--cpu-precision fp32)."
            )
            raise DataError(msg)
        return out, read_s, model_s

    def labels_for(
        self, sid: str, coords: np.ndarray, tiling_info: dict[str, Any]
    ) -> Any:
        """Patch labels from this slide's annotation file, or None when there is none."""
        if not self.cfg.annotations:
            return None
        from tiahnm.slides.annotations import find_annotation, label_patches

        path = find_annotation(self.cfg.annotations, sid)
        if path is None:
            return None
        return label_patches(
            path,
            coords,
            tuple(tiling_info["patch_size_level0"]),
            dimensions=tuple(tiling_info["dimensions"]),
            min_overlap=self.cfg.min_overlap,
            classes=self.cfg.annotation_classes or None,
        )

    def process(self, path: Path) -> SlideResult:
        """Extract one slide (raises on failure; see :meth:`run` for isolation)."""
        from tiahnm.slides.dataset import SlidePatchDataset
        from tiahnm.slides.store import add_instance_labels, write_feature_file

        sid = slide_id(path)
        target = self.output_path(sid)
        start = time.perf_counter()
        done, attrs = self.is_done(sid)
        if done and attrs is not None:
            self._refresh_labels(sid, target, attrs, add_instance_labels)
            return SlideResult(
                sid,
                str(path),
                "skipped",
                n_patches=int(attrs.get("n_patches", 0)),
                seconds=time.perf_counter() - start,
                output=str(target),
            )
        tcfg = self.cfg.tiling
        slide = open_slide(
            path, mpp=self.cfg.mpp, power=self.cfg.power, units=tcfg.units
        )
        try:
            for note in slide.notes:
                logger.warning(note)
            tiling = tile_slide(slide, tcfg)
            tiling_s = time.perf_counter() - start
            if len(tiling) == 0:
                msg = (
                    f"{path}: no patches with tissue fraction >= {tcfg.min_tissue} "
                    f"(masker {tcfg.masker}, {tiling.n_grid} patches in the grid); "
                    "lower --min-tissue or use --masker none."
                )
                raise DataError(msg)
            dataset = SlidePatchDataset(
                slide.source,
                tiling.bounds,
                tcfg.resolution,
                tcfg.units,
                reader=slide.reader if self.loader_workers(len(tiling)) == 0 else None,
            )
            features, read_s, model_s = self.encode(dataset)
            info = _slide_info(sid, path, slide, tiling)
        finally:
            slide.close()
        t_write = time.perf_counter()
        labels = self.labels_for(
            sid,
            tiling.coords,
            {
                "patch_size_level0": tiling.patch_size_level0,
                "dimensions": tiling.dimensions,
            },
        )
        write_feature_file(
            target,
            features=features,
            coords=tiling.coords,
            tissue_fraction=tiling.tissue_fraction,
            attrs=self._file_attrs(info),
            coords_attrs={
                "coord_space": "level0",
                "patch_size": tcfg.patch_size,
                "stride": tcfg.step,
                "patch_size_level0": list(tiling.patch_size_level0),
                "resolution": tcfg.resolution,
                "units": tcfg.units,
                "scale": list(tiling.scale),
            },
            instance_labels=None if labels is None else labels.labels,
            instance_overlap=None if labels is None else labels.overlap,
            labels_attrs=None if labels is None else labels.attrs,
        )
        now = time.perf_counter()
        return SlideResult(
            sid,
            str(path),
            "done",
            n_patches=len(tiling),
            n_grid=tiling.n_grid,
            seconds=now - start,
            tiling_s=tiling_s,
            read_s=read_s,
            model_s=model_s,
            write_s=now - t_write,
            output=str(target),
        )

    def _refresh_labels(
        self, sid: str, target: Path, attrs: dict[str, Any], add: Callable[..., None]
    ) -> None:
        """Add/replace instance labels of a finished slide when the annotation changed."""
        if not self.cfg.annotations:
            return
        from tiahnm.slides.store import read_feature_arrays

        arrays = read_feature_arrays(target)
        info = json.loads(attrs.get("tiling_info", "{}") or "{}")
        if not info or arrays.coords is None:
            return
        labels = self.labels_for(sid, arrays.coords, info)
        if labels is None:
            return
        old = attrs.get("instance_labels_attrs") or {}
        if (
            old.get("annotation_sha256") == labels.attrs["annotation_sha256"]
            and float(old.get("min_overlap", -1)) == labels.attrs["min_overlap"]
            and old.get("classes", "[]") == json.dumps(labels.attrs["classes"])
        ):
            return
        add(target, labels.labels, labels.overlap, labels.attrs)

    def _file_attrs(self, info: dict[str, Any]) -> dict[str, Any]:
        import tiatoolbox
        import torch

        from tiahnm import __version__

        s = self.settings
        t = self.cfg.tiling
        return {
            **info,
            "encoder": s["encoder"],
            "encoder_options": s["encoder_options"],
            "encoder_weights_sha256": s["encoder_weights_sha256"],
            "weights_sha256": s["encoder_weights_sha256"],
            "encoder_state_sha256": s["encoder_state_sha256"],
            "encoder_out_dim": s["encoder_out_dim"],
            "preprocessing": s["preprocessing"],
            **({"encoder_card": s["encoder_card"]} if "encoder_card" in s else {}),
            "precision": s["precision"],
            "resolution": t.resolution,
            "units": t.units,
            "patch_size": t.patch_size,
            "stride": t.step,
            "masker": t.masker,
            "min_tissue": t.min_tissue,
            "coords_space": "level0",
            "tiatoolbox_version": tiatoolbox.__version__,
            "tiahnm_version": __version__,
            "torch_version": torch.__version__,
            "settings": self._key,
        }

    def run(
        self,
        paths: Sequence[Path],
        *,
        on_result: Callable[[SlideResult], None] | None = None,
    ) -> list[SlideResult]:
        """Extract every slide; a failing slide is recorded and the others go on."""
        results: list[SlideResult] = []
        seen: dict[str, Path] = {}
        for path in paths:
            sid = slide_id(path)
            start = time.perf_counter()
            if sid in seen:
                result = SlideResult(
                    sid,
                    str(path),
                    "failed",
                    error=f"duplicate slide id {sid!r} (also {seen[sid]}); rename one.",
                )
            else:
                seen[sid] = path
                try:
                    result = self.process(path)
                except Exception as exc:  # one bad slide must not stop the others
                    error = (
                        str(exc)
                        if isinstance(exc, DataError)
                        else (f"{path}: {type(exc).__name__}: {exc}")
                    )
                    logger.debug("slide %s failed", path, exc_info=True)
                    result = SlideResult(
                        sid,
                        str(path),
                        "failed",
                        seconds=time.perf_counter() - start,
                        error=error,
                    )
            results.append(result)
            if on_result is not None:
                on_result(result)
        from tiahnm.utils.logs import log_dropped

        tiled = [r for r in results if r.status == "done" and r.n_grid]
        log_dropped(
            "extract",
            [(r.slide, r.n_grid - r.n_patches, r.n_grid) for r in tiled],
            f"tissue fraction < {self.cfg.tiling.min_tissue}",
        )
        return results


def shard_slides(paths: Sequence[Path], rank: int, world_size: int) -> list[int]:
    """Indices of the slides rank ``rank`` extracts.

    Slides are dealt round robin by slide id (first occurrence), so files with the
    same id land on the same rank, which reports the duplicate.
    """
    first: dict[str, int] = {}
    owner = []
    for path in paths:
        sid = slide_id(path)
        first.setdefault(sid, len(first))
        owner.append(first[sid] % world_size)
    return [i for i, r in enumerate(owner) if r == rank]


def write_failures_csv(path: str | Path, results: Sequence[SlideResult]) -> Path:
    """``slide,error`` rows for the failed slides (header only when none failed)."""
    from tiahnm.utils.io import atomic_open

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["slide", "error"])
    for r in results:
        if r.status == "failed":
            writer.writerow([r.path, r.error])
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())
    return Path(path)


def extract_features(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    cfg: ExtractConfig,
    *,
    on_result: Callable[[SlideResult], None] | None = None,
) -> ExtractSummary:
    """Extract features of every slide in ``inputs`` into ``output_dir``.

    Args:
        inputs (Sequence[str | Path]): Slide files and/or folders of slides.
        output_dir (str | Path): Output folder (created).
        cfg (ExtractConfig): Settings.
        on_result (Callable | None): Called after each slide (progress).

    Returns:
        ExtractSummary: Per-slide outcomes; ``failures.csv`` and
        ``extract_summary.json`` are written in ``output_dir``.

    Raises:
        DataError: An input does not exist, or no slide was found.
        ConfigError / PluginError: Bad settings or encoder.
    """
    start = time.perf_counter()
    paths = find_slides(inputs, suffixes=cfg.suffixes)
    if not paths:
        msg = (
            f"no slides found in {', '.join(map(str, inputs))} "
            f"(suffixes: {', '.join(cfg.suffixes)})."
        )
        raise DataError(msg)
    from tiahnm.runtime.distributed import (
        init_distributed,
    )

    dctx = init_distributed(cfg.device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    from tiahnm.utils.lock import folder_lock

    with folder_lock(output_dir, enabled=dctx.is_main):
        return _extract_locked(paths, output_dir, cfg, dctx, start, on_result)


def _extract_locked(
    paths: list[Path],
    output_dir: Path,
    cfg: ExtractConfig,
    dctx: Any,
    start: float,
    on_result: Callable[[SlideResult], None] | None,
) -> ExtractSummary:
    """:func:`extract_features` once the folder is locked."""
    from tiahnm.runtime.distributed import all_gather_objects, barrier
    from tiahnm.utils.io import write_json

    if dctx.is_main:  # not while another rank may be writing its first file
        for stale in output_dir.glob(".*.h5.*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
    barrier(dctx)
    extractor = Extractor(cfg, output_dir)
    startup_s = time.perf_counter() - start
    mine = shard_slides(paths, dctx.rank, dctx.world_size)
    results = extractor.run([paths[i] for i in mine], on_result=on_result)
    if dctx.enabled:
        parts = all_gather_objects(
            [(i, asdict(r)) for i, r in zip(mine, results, strict=True)], dctx
        )
        merged = sorted((p for part in parts for p in part), key=lambda p: p[0])
        results = [SlideResult(**r) for _, r in merged]
    summary = ExtractSummary(
        results=results,
        seconds=time.perf_counter() - start,
        output_dir=str(output_dir),
        settings=extractor.settings,
        startup_s=startup_s,
    )
    if dctx.is_main:
        write_failures_csv(output_dir / "failures.csv", results)
        write_json(output_dir / "extract_summary.json", summary.as_dict())
    barrier(dctx)  # the merged files exist before any rank returns
    return summary


def _slide_info(sid: str, path: Path, slide: Any, tiling: Any) -> dict[str, Any]:
    """What a feature file records about its slide and tiling."""
    return {
        "slide_id": sid,
        "slide_path": str(Path(path).resolve()),  # heatmaps from any folder
        "level0_dimensions": list(tiling.dimensions),
        "level0_mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "objective_power": slide.power,
        "objective_power_source": slide.power_source,
        "reader": type(slide.reader).__name__,
        "n_grid_patches": tiling.n_grid,
        "mask_scale": tiling.mask_scale,
        "tiling_info": {
            "patch_size_level0": list(tiling.patch_size_level0),
            "dimensions": list(tiling.dimensions),
        },
    }
