"""``tiahnm run``: every stage the config asks for, in order, each resumable.

Stages:

1. ``extract`` (when ``extract.slides`` is set): tissue mask, tiling and patch
   features of every slide (:mod:`tiahnm.slides.extract`; a slide already done with
   the same settings is skipped inside the stage too);
2. ``train``: the head + miner + losses under cross-validation, with the slide- and
   patch-level evaluation of every fold (:func:`tiahnm.crossval.run_training`; a
   finished fold is skipped, an interrupted one resumes from its last epoch);
3. ``heatmaps`` (when ``evaluation.heatmaps`` is not 0): instance-score heatmaps of
   test slides, with the annotated regions outlined when there are annotations;
4. ``report``: ``report.md`` with the metrics, plots and heatmaps.

``<output_dir>/stages.json`` records, for every stage, a hash of the settings it ran
with and whether it finished. A finished stage whose settings hash is unchanged is
skipped. Training results made with other settings are never mixed with new ones:
the ``train`` stage then stops with a :class:`~tiahnm.errors.ConfigError` naming the
changed keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tiahnm.config import Config
from tiahnm.errors import ConfigError
from tiahnm.utils.io import write_json

logger = logging.getLogger(__name__)

MANIFEST = "stages.json"
STAGES = ("extract", "train", "heatmaps", "report")
#: Keys of ``train`` that do not change results (left out of the settings hash).
_TRAIN_RUNTIME_KEYS = (
    "progress",
    "device",
    "num_threads",
    "checkpoint_every",
    "prefetch",
    "loader_workers",
    "pin_memory",
)


@dataclass
class StageOutcome:
    """What happened to one stage.

    Attributes:
        name (str): Stage name.
        status (str): ``done``, ``skipped`` (already done with the same settings) or
            ``off`` (not asked for by the config).
        seconds (float): Wall time.
        detail (str): One line for the user.
    """

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""


@dataclass
class PipelineResult:
    """Outcome of :func:`run_pipeline`.

    Attributes:
        summary (dict): The training summary (``summary.json``).
        exit_code (int): 0, or 3 when some slides failed extraction (partial).
        report (Path | None): ``report.md``.
        heatmaps (list[Path]): Heatmap figures.
        stages (list[StageOutcome]): One per stage, in order.
    """

    summary: dict[str, Any]
    exit_code: int = 0
    report: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    stages: list[StageOutcome] = field(default_factory=list)


def settings_hash(settings: Any) -> str:
    """A short stable hash of JSON-able ``settings``."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageManifest:
    """``stages.json``: settings hash and state of every stage (written atomically).

    Args:
        path (str | Path): The manifest file (read when it exists).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        stages = data.get("stages") if isinstance(data, dict) else None
        self.stages: dict[str, dict[str, Any]] = (
            stages if isinstance(stages, dict) else {}
        )

    def entry(self, name: str) -> dict[str, Any] | None:
        """The record of stage ``name``, if any."""
        return self.stages.get(name)

    def is_done(self, name: str, key: str) -> bool:
        """Whether ``name`` finished with settings hash ``key``."""
        entry = self.stages.get(name) or {}
        return entry.get("status") == "done" and entry.get("key") == key

    def start(self, name: str, key: str, settings: Any) -> None:
        """Record that ``name`` started with these settings."""
        self.stages[name] = {"key": key, "status": "running", "settings": settings}
        self._save()

    def finish(self, name: str, key: str, seconds: float, **info: Any) -> None:
        """Record that ``name`` finished."""
        entry = self.stages.setdefault(name, {"key": key})
        entry.update(
            key=key,
            status="done",
            seconds=round(seconds, 3),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            **info,
        )
        self._save()

    def _save(self) -> None:
        if _is_main_process():  # under torchrun only rank 0 writes
            write_json(self.path, {"stages": self.stages})


def _is_main_process() -> bool:
    from tiahnm.runtime.distributed import env_context

    return env_context().is_main


def _fingerprint(paths: list[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file (a changed file changes the hash)."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def extract_settings(config: Config) -> dict[str, Any]:
    """What the extract stage's outputs depend on (its files included)."""
    from tiahnm.slides.annotations import ANNOTATION_SUFFIXES
    from tiahnm.slides.reader import find_slides

    stage = config.extract
    settings = {
        k: v
        for k, v in config.to_dict()["extract"].items()
        if k not in ("batch_size", "num_workers")
    }
    settings["seed"] = config.seed
    settings["slide_files"] = _fingerprint(find_slides(stage.slides))
    if stage.annotations:
        found = find_slides([stage.annotations], suffixes=ANNOTATION_SUFFIXES)
        settings["annotation_files"] = _fingerprint(found)
    return settings


def _features_dir(config: Config) -> Path:
    stage = config.extract
    return Path(stage.features_dir or Path(config.output_dir) / "features")


def _with_features(config: Config, features_dir: Path, *, failed: bool) -> Config:
    """``config`` reading the extracted features (``h5_folder`` without a folder)."""
    data = config.data
    if data.source == "h5_folder" and "features_dir" not in data.options:
        options = dict(data.options, features_dir=str(features_dir))
        if failed:
            options.setdefault("missing", "skip")
        config = replace(config, data=replace(data, options=options))
    return config


def run_extract_stage(config: Config) -> tuple[Config, Any]:
    """Extract features when the config names slides; point the data at them.

    Returns:
        tuple: The config to train with (``data`` set to the feature folder when the
        source is ``h5_folder`` without a ``features_dir``) and the extraction summary
        (None when there is no extract stage).
    """
    stage = config.extract
    if not stage.slides:
        return config, None
    from tiahnm.slides.extract import ExtractConfig, extract_features
    from tiahnm.slides.tiling import TilingConfig

    features_dir = _features_dir(config)
    tiling = TilingConfig(
        resolution=stage.resolution,
        units=stage.units,
        patch_size=stage.patch_size,
        stride=stage.stride,
        masker=stage.masker,
        min_tissue=stage.min_tissue,
    )
    cfg = ExtractConfig(
        tiling=tiling,
        encoder=stage.encoder,
        weights=stage.weights,
        encoder_options=dict(stage.encoder_options),
        batch_size=stage.batch_size,
        num_workers=stage.num_workers,
        device=config.train.device,
        cpu_precision=stage.cpu_precision,
        mpp=stage.mpp,
        power=stage.power,
        seed=config.seed,
        annotations=stage.annotations,
    )
    summary = extract_features(stage.slides, features_dir, cfg)
    if summary.failed:
        logger.warning(
            "%d slide(s) failed extraction and are left out (see %s).",
            len(summary.failed),
            features_dir / "failures.csv",
        )
    return _with_features(config, features_dir, failed=bool(summary.failed)), summary


def train_settings(config: Config, extract_key: str | None) -> dict[str, Any]:
    """What the training results depend on (runtime-only keys left out)."""
    d = config.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in _TRAIN_RUNTIME_KEYS}
    evaluation = {
        k: v for k, v in d["evaluation"].items() if k not in ("report", "heatmaps")
    }
    return {
        "seed": d["seed"],
        "data": d["data"],
        "head": d["head"],
        "miner": d["miner"],
        "losses": d["losses"],
        "train": train,
        "cv": d["cv"],
        "evaluation": evaluation,
        "features": extract_key,
    }


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            key = f"{prefix}.{k}" if prefix else str(k)
            out += _changed_keys(old.get(k), new.get(k), key)
        return out
    return [] if old == new else [prefix or "(all)"]


def _check_same_training(
    manifest: StageManifest, key: str, settings: dict[str, Any], out: Path
) -> None:
    """Refuse to resume training results made with other settings."""
    entry = manifest.entry("train")
    if not entry or entry.get("key") == key or not (out / "folds").is_dir():
        return
    changed = _changed_keys(entry.get("settings") or {}, settings)
    shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
    msg = (
        f"{out}: holds training results made with other settings (changed: "
        f"{shown}); use another --output-path, or delete {out / 'folds'} and "
        f"{out / MANIFEST} to retrain there."
    )
    raise ConfigError(msg)


def _read_summary(path: Path) -> dict[str, Any] | None:
    """``summary.json`` of a finished train stage; None when absent or damaged.

    A damaged (e.g. truncated) summary is recomputed from the folds' results: the
    train stage runs again and skips every finished fold.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        logger.warning("%s: damaged (%s); recomputed from the folds.", path, exc)
        return None
    return data if isinstance(data, dict) and "metrics" in data else None


def _outline_rings(annotations: str | None, slide_id: str) -> list[Any]:
    """Exterior rings (level-0 ``[K, 2]``) of a slide's GeoJSON/XML annotation."""
    from tiahnm.evaluation.heatmap import outline_rings

    return outline_rings(annotations, slide_id)


def _pick_slides(slides: list[Any], limit: int) -> list[Any]:
    """Up to ``limit`` slides (all for -1), alternating between labels."""
    by_label: dict[int, list[Any]] = {}
    for s in sorted(slides, key=lambda s: s.slide_id):
        by_label.setdefault(s.label, []).append(s)
    order = []
    queues = [by_label[k] for k in sorted(by_label, reverse=True)]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order if limit < 0 else order[:limit]


def run_heatmap_stage(config: Config) -> list[Path]:
    """Heatmaps of test slides from the folds' ``instance_scores.h5``.

    Slides without coordinates cannot be drawn and are left out; one that fails is
    logged and the others go on.

    Returns:
        list[Path]: The figures written in ``<output_dir>/heatmaps``.
    """
    from tiahnm.evaluation.heatmap import render_heatmap
    from tiahnm.evaluation.reference import parse_reference
    from tiahnm.evaluation.scores import find_score_files, read_instance_scores

    out = Path(config.output_dir)
    seen: dict[str, tuple[Any, dict[str, Any]]] = {}
    for path in find_score_files(out):
        slides, attrs = read_instance_scores(path)
        for s in slides:
            if s.coords is not None and len(s.coords) and s.slide_id not in seen:
                seen[s.slide_id] = (s, attrs)
    picked = _pick_slides([s for s, _ in seen.values()], config.evaluation.heatmaps)
    names = config.data.options.get("classes")
    class_names = dict(enumerate(names)) if isinstance(names, list) else None
    written = []
    for s in picked:
        attrs = seen[s.slide_id][1]
        stored = attrs.get("instance_threshold")
        try:
            res = render_heatmap(
                s,
                out / "heatmaps",
                kind=attrs.get("score_kind"),
                fixed_threshold=0.5 if stored in (None, "") else float(stored),
                class_names=class_names,
                outlines=_outline_rings(config.extract.annotations, s.slide_id),
                reference=parse_reference(attrs.get("val_reference")),
            )
        except Exception as exc:  # one slide must not stop the others
            logger.warning("heatmap of %s failed: %s", s.slide_id, exc)
            continue
        written.append(res.png)
    return written


def run_pipeline(
    config: Config, *, echo: Callable[[str], None] | None = None
) -> PipelineResult:
    """Validate the whole config, lock the output folder, then run the stages.

    See :func:`_run_stages`. Every component name and option is checked before the
    first stage (:func:`tiahnm.validate.validate_config`), and the output folder has
    one writer at a time (:func:`tiahnm.utils.lock.folder_lock`).

    Raises:
        FolderLockedError: Another live run writes into ``config.output_dir``.
    """
    from tiahnm.utils.lock import folder_lock
    from tiahnm.validate import validate_config

    validate_config(config, warn=echo and (lambda w: echo(f"Warning: {w}")))
    with folder_lock(config.output_dir, enabled=_is_main_process()):
        return _run_stages(config, echo=echo)


def _run_stages(
    config: Config, *, echo: Callable[[str], None] | None = None
) -> PipelineResult:
    """Run every configured stage, skipping those done with the same settings.

    Args:
        config (Config): The run config.
        echo (Callable[[str], None] | None): Called with one line per stage
            (default: the log).

    Returns:
        PipelineResult: Summary, exit code (3 when some slides failed), report path,
        heatmaps and what each stage did.
    """
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _StageRun(
        config,
        out,
        StageManifest(out / MANIFEST),
        PipelineResult(summary={}),
        echo or logger.info,
    )
    extract_key = _extract_stage(run)
    train_key = _train_stage(run, extract_key)
    if not _is_main_process():  # heatmaps and the report are rank 0's
        return run.result
    heat_key = _heatmap_stage(run, train_key)
    _report_stage(run, train_key, heat_key)
    return run.result


@dataclass
class _StageRun:
    """What the stages of one :func:`_run_stages` call share.

    Attributes:
        config (Config): The config; the extract stage points its data at the
            features.
        out (Path): The output folder.
        manifest (StageManifest): ``stages.json``.
        result (PipelineResult): Filled in stage by stage.
        say (Callable[[str], None]): One line per stage.
        trained (bool): Whether the train stage ran (rather than being skipped).
    """

    config: Config
    out: Path
    manifest: StageManifest
    result: PipelineResult
    say: Callable[[str], None]
    trained: bool = False

    def record(self, outcome: StageOutcome) -> None:
        """Keep ``outcome`` and say it."""
        self.result.stages.append(outcome)
        how = {"skipped": "skipped (done with the same settings)", "off": "off"}
        line = f"[{outcome.name}] {how.get(outcome.status, 'done')}"
        if outcome.status == "done":
            line += f" in {outcome.seconds:.1f} s"
        self.say(line + (f": {outcome.detail}" if outcome.detail else ""))

    def timed(
        self,
        name: str,
        key: str,
        settings: Any,
        work: Callable[[], Any],
        announce: str | None = None,
    ) -> tuple[Any, float]:
        """Record that stage ``name`` started, say ``announce``, run ``work``.

        Returns:
            tuple: What ``work`` returned and its wall time in seconds.
        """
        t0 = time.perf_counter()
        self.manifest.start(name, key, settings)
        if announce:
            self.say(announce)
        value = work()
        return value, time.perf_counter() - t0


def _extract_stage(run: _StageRun) -> str | None:
    """Stage 1: extract (or reuse) the features; returns its settings hash."""
    config, manifest = run.config, run.manifest
    if not config.extract.slides:
        run.record(StageOutcome("extract", "off", detail="no extract.slides"))
        return None
    settings = extract_settings(config)
    key = settings_hash(settings)
    entry = manifest.entry("extract") or {}
    features_dir = _features_dir(config)
    done = manifest.is_done("extract", key) and not entry.get("failed")
    if done and all(
        (features_dir / f"{sid}.h5").is_file() for sid in entry.get("slides", [])
    ):
        run.config = _with_features(config, features_dir, failed=False)
        run.record(StageOutcome("extract", "skipped", detail=str(features_dir)))
        return key
    (run.config, summary), seconds = run.timed(
        "extract",
        key,
        settings,
        lambda: run_extract_stage(config),
        f"[extract] tissue masks, tiles and features -> {features_dir}",
    )
    ok = [r.slide for r in summary.results if r.status != "failed"]
    manifest.finish(
        "extract",
        key,
        seconds,
        slides=ok,
        failed=len(summary.failed),
        patches=sum(r.n_patches for r in summary.results),
    )
    if summary.failed:
        run.result.exit_code = 3
    detail = (
        f"{len(ok)} slides ({summary.count('skipped')} already done), "
        f"{len(summary.failed)} failed"
    )
    run.record(StageOutcome("extract", "done", seconds, detail))
    return key


def _train_stage(run: _StageRun, extract_key: str | None) -> str:
    """Stage 2: cross-validated training and evaluation; returns its settings hash."""
    config = run.config
    settings = train_settings(config, extract_key)
    key = settings_hash(settings)
    summary_path = run.out / "summary.json"
    done = run.manifest.is_done("train", key)
    summary = _read_summary(summary_path) if done else None
    if summary is not None:
        run.result.summary = summary
        run.record(StageOutcome("train", "skipped", detail=str(summary_path)))
        return key
    from tiahnm.crossval import run_training

    _check_same_training(run.manifest, key, settings, run.out)
    run.result.summary, seconds = run.timed(
        "train",
        key,
        settings,
        lambda: run_training(config),
        f"[train] {config.head.name} + miner {config.miner.name} under CV",
    )
    run.manifest.finish("train", key, seconds)
    run.trained = True
    detail = f"{run.result.summary['n_folds']} folds"
    run.record(StageOutcome("train", "done", seconds, detail))
    return key


def _heatmap_stage(run: _StageRun, train_key: str) -> str:
    """Stage 3: heatmaps of test slides; returns its settings hash."""
    config, manifest, out = run.config, run.manifest, run.out
    n_maps = config.evaluation.heatmaps
    settings = {"train": train_key, "n": n_maps, "ann": config.extract.annotations}
    key = settings_hash(settings)
    entry = manifest.entry("heatmaps") or {}
    recorded = [Path(p) for p in entry.get("files", [])]
    if n_maps == 0:
        run.record(StageOutcome("heatmaps", "off", detail="evaluation.heatmaps is 0"))
    elif (
        not run.trained
        and manifest.is_done("heatmaps", key)
        and all(p.is_file() for p in recorded)
    ):
        run.result.heatmaps = recorded
        run.record(StageOutcome("heatmaps", "skipped", detail=str(out / "heatmaps")))
    else:
        run.result.heatmaps, seconds = run.timed(
            "heatmaps", key, settings, lambda: run_heatmap_stage(config)
        )
        files = [str(p) for p in run.result.heatmaps]
        manifest.finish("heatmaps", key, seconds, files=files)
        detail = f"{len(files)} in {out / 'heatmaps'}"
        run.record(StageOutcome("heatmaps", "done", seconds, detail))
    return key


def _report_stage(run: _StageRun, train_key: str, heat_key: str) -> None:
    """Stage 4: ``report.md`` (and ``report.html`` when training did not write it)."""
    report = run.out / "report.md"
    key = settings_hash({"train": train_key, "heatmaps": heat_key})
    if not run.config.evaluation.report:
        run.record(StageOutcome("report", "off", detail="evaluation.report is false"))
    elif not run.trained and run.manifest.is_done("report", key) and report.is_file():
        run.result.report = report
        run.record(StageOutcome("report", "skipped", detail=str(report)))
    else:
        run.result.report, seconds = run.timed(
            "report", key, {}, lambda: _write_report(run.out)
        )
        if run.result.report is not None:
            run.manifest.finish("report", key, seconds)
        detail = str(run.result.report) if run.result.report else "could not be written"
        run.record(StageOutcome("report", "done", seconds, detail))


def _write_report(out: Path) -> Path | None:
    """``report.md`` of the run in ``out`` (None when it could not be written)."""
    from tiahnm.evaluation.report import load_run, write_report_safely
    from tiahnm.tasks import task_from_spec

    summary, folds = load_run(out)
    task = task_from_spec(summary.get("task_spec"))
    report = write_report_safely(out, summary, folds, task)
    if not (out / "report.html").is_file():  # run_training writes it
        from tiahnm.evaluation.html_report import write_html_report_safely

        write_html_report_safely(out)
    return report


__all__ = [
    "MANIFEST",
    "STAGES",
    "PipelineResult",
    "StageManifest",
    "StageOutcome",
    "extract_settings",
    "run_extract_stage",
    "run_heatmap_stage",
    "run_pipeline",
    "settings_hash",
    "train_settings",
]
