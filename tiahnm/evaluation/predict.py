"""Slide predictions for new slides or feature files with trained heads.

A checkpoint (``best.pt`` of a fold) holds the head only: its name, options, weights,
feature normalisation and the decision threshold chosen on that fold's validation
bags. Slides given as images are first encoded with :mod:`tiahnm.slides.extract`
using the encoder settings passed in (they must be those the training features were
made with; when the run's training features can be found, differences are warned
about). A run folder stands for every fold's ``best.pt``: their probabilities and
instance scores are averaged (an ensemble) and the threshold is the mean of the fold
thresholds.

Each slide is handled on its own: a slide that cannot be read, encoded or predicted
is listed in ``failures.csv`` and the others complete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tiahnm.errors import DataError
from tiahnm.evaluation.scores import SCORES_FILE, SlideScores, write_instance_scores
from tiahnm.utils.io import atomic_open, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tiahnm.heads.base import MILHead
    from tiahnm.slides.extract import ExtractConfig

logger = logging.getLogger(__name__)

#: Feature-file attributes compared with the training features (warning only).
COMPARED_SETTINGS = (
    "encoder",
    "encoder_state_sha256",
    "resolution",
    "units",
    "patch_size",
)


@dataclass
class LoadedHead:
    """A trained head from a checkpoint.

    Attributes:
        path (Path): The checkpoint.
        head (MILHead): The head, in eval mode on its device.
        n_classes (int): Classes.
        in_dim (int): Feature width it expects.
        threshold (float): Slide threshold chosen on its validation bags.
        instance_threshold (float): Instance threshold (0.5 unless chosen).
        mean (torch.Tensor | None): Feature mean of its training bags (if used).
        std (torch.Tensor | None): Feature std of its training bags (if used).
        task_spec (dict | None): The task it was trained for (``name``, ``options``;
            None in checkpoints from before tasks: binary / multiclass).
    """

    path: Path
    head: MILHead
    n_classes: int
    in_dim: int
    threshold: float
    instance_threshold: float = 0.5
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    task_spec: dict[str, Any] | None = None


def checkpoint_paths(checkpoint: str | Path) -> list[Path]:
    """``[checkpoint]`` for a file; every ``folds/*/best.pt`` for a run folder.

    Raises:
        DataError: Nothing found.
    """
    path = Path(checkpoint)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.glob("folds/*/best.pt"))
        if not found and (path / "best.pt").is_file():
            found = [path / "best.pt"]
        if found:
            return found
        msg = f"{path}: no folds/*/best.pt (give a best.pt or a training run folder)."
        raise DataError(msg)
    msg = f"{path}: checkpoint not found."
    raise DataError(msg)


def _run_identity(ckpt: dict[str, Any]) -> str:
    """What must agree between the heads of one ensemble: head, options, run."""
    options = json.dumps(ckpt.get("head_options") or {}, sort_keys=True, default=str)
    return f"{ckpt.get('head')!s} {options} run={ckpt.get('run', '?')}"


def _check_one_run(checkpoint: str | Path, runs: list[tuple[Path, str]]) -> None:
    """Refuse a folder whose fold checkpoints come from different runs."""
    groups: dict[str, list[str]] = {}
    for path, ident in runs:
        groups.setdefault(ident, []).append(path.parent.name)
    if len(groups) > 1:
        shown = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())
        msg = (
            f"{checkpoint}: the fold checkpoints come from different runs or heads "
            f"({shown}); an ensemble needs the folds of one run. Give one best.pt, "
            "or a folder holding the folds of one run."
        )
        raise DataError(msg)


def load_heads(checkpoint: str | Path, device: torch.device) -> list[LoadedHead]:
    """Build every head of ``checkpoint`` (a ``best.pt`` or a run folder).

    Raises:
        DataError: A checkpoint is unreadable or not a head checkpoint, or the heads
            of a run disagree on feature width or classes.
    """
    from tiahnm.plugins import get_registry
    from tiahnm.runtime.checkpoint import load_checkpoint

    heads = []
    runs: list[tuple[Path, str]] = []
    for path in checkpoint_paths(checkpoint):
        ckpt = load_checkpoint(path)
        runs.append((path, _run_identity(ckpt)))
        missing = [
            k for k in ("head", "in_dim", "n_classes", "state_dict") if k not in ckpt
        ]
        if missing:
            msg = f"{path}: not a head checkpoint (no {', '.join(missing)}); give best.pt."
            raise DataError(msg)
        head = get_registry("head").create(
            ckpt["head"],
            int(ckpt["in_dim"]),
            int(ckpt["n_classes"]),
            key=f"{path}: head_options",
            **dict(ckpt.get("head_options") or {}),
        )
        try:
            head.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            msg = f"{path}: weights do not fit head {ckpt['head']!r} ({exc})."
            raise DataError(msg) from None
        if ckpt.get("instance_score"):  # the score the run evaluated
            head.set_eval_score(str(ckpt["instance_score"]))
        head.to(device).eval()
        norm = ckpt.get("normalisation") or {}
        heads.append(
            LoadedHead(
                path=path,
                head=head,
                n_classes=int(ckpt["n_classes"]),
                in_dim=int(ckpt["in_dim"]),
                threshold=float(ckpt.get("threshold", 0.5)),
                instance_threshold=float(ckpt.get("instance_threshold", 0.5)),
                mean=None if norm.get("mean") is None else norm["mean"].to(device),
                std=None if norm.get("std") is None else norm["std"].to(device),
                task_spec=ckpt.get("task_spec"),
            )
        )
    _check_one_run(checkpoint, runs)
    shapes = {(h.in_dim, h.n_classes, repr(h.task_spec)) for h in heads}
    if len(shapes) > 1:
        msg = f"{checkpoint}: heads differ in (in_dim, n_classes, task): {sorted(shapes)}."
        raise DataError(msg)
    return heads


def heads_task(heads: Sequence[LoadedHead]) -> Any:
    """The :class:`~tiahnm.tasks.Task` the heads were trained for."""
    from tiahnm.tasks import task_from_spec

    return task_from_spec(heads[0].task_spec, heads[0].n_classes)


def ensemble_predict(
    heads: Sequence[LoadedHead],
    features: torch.Tensor,
    device: torch.device,
    task: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Mean task outputs ``[W]``, instance scores ``[N]`` and class scores ``[N, C]``.

    The outputs are the task's per-bag row (class probabilities; ``[risk, logits]``
    for survival) averaged over the heads. Class scores (per-class instance
    probabilities) come only for a task with ``per_class_instance_scores`` (C > 2).

    Raises:
        DataError: The features do not have the width the heads expect.
    """
    import torch

    from tiahnm.evaluation.fold import class_instance_scores

    task = task or heads_task(heads)
    width = int(features.shape[1])
    if width != heads[0].in_dim:
        msg = (
            f"features have width {width}, the head expects {heads[0].in_dim} "
            "(extract with the encoder the head was trained on)."
        )
        raise DataError(msg)
    outputs, scores, per_class = [], [], []
    with torch.inference_mode():
        x0 = features.to(device)
        for h in heads:
            x = x0 if h.mean is None else (x0 - h.mean) / h.std
            out = h.head(x)
            outputs.append(task.outputs(out).float().cpu().numpy())
            try:
                scores.append(h.head.instance_scores(out).float().cpu().numpy())
            except (ValueError, NotImplementedError):
                scores = None  # type: ignore[assignment]
            if task.per_class_instance_scores and per_class is not None:
                one = class_instance_scores(h.head, [_FeatureBag(x)])
                per_class = None if one is None else [*per_class, one[0]]
    mean_scores = None if not scores else np.mean(np.stack(scores), axis=0)
    mean_class = None if not per_class else np.mean(np.stack(per_class), axis=0)
    return np.mean(np.stack(outputs), axis=0), mean_scores, mean_class


@dataclass
class _FeatureBag:
    """Just the features (what :func:`class_instance_scores` reads)."""

    features: torch.Tensor


@dataclass
class Prediction:
    """One predicted slide (a row of ``predictions.csv``).

    Attributes:
        slide_id (str): Slide id.
        probability (float): The task's slide score: positive-class probability (max
            class probability for multi-class heads; the risk for survival).
        prediction (int): Class at the stored threshold (1 = high risk for survival).
        n_patches (int): Patches in the bag.
        columns (dict): The task's ``predictions.csv`` columns
            (:meth:`~tiahnm.tasks.Task.output_columns`).
    """

    slide_id: str
    probability: float
    prediction: int
    n_patches: int
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictSummary:
    """Outcome of :func:`predict_slides`.

    Attributes:
        predictions (list[Prediction]): Predicted slides.
        failures (list[tuple[str, str]]): ``(input, error)`` of failed slides.
        output_dir (Path): Output folder.
        checkpoints (list[str]): The heads used (more than one: an ensemble).
        threshold (float): Slide threshold used.
        warnings (list[str]): Settings differences from the training features.
        seconds (float): Wall time.
    """

    predictions: list[Prediction]
    failures: list[tuple[str, str]]
    output_dir: Path
    checkpoints: list[str]
    threshold: float
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _split_inputs(
    inputs: Sequence[str | Path], suffixes: Sequence[str]
) -> tuple[list[Path], list[Path], list[tuple[str, str]]]:
    """``(feature files, slide files, failures)`` from files and folders."""
    from tiahnm.slides.reader import find_slides

    h5s: list[Path] = []
    slides: list[Path] = []
    failures: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            h5s += sorted(p for p in path.iterdir() if p.suffix.lower() == ".h5")
            slides += find_slides([path], suffixes=suffixes)
        elif path.is_file():
            (h5s if path.suffix.lower() == ".h5" else slides).append(path)
        else:
            failures.append((str(path), "no such file or folder."))
    return h5s, slides, failures


def training_feature_attrs(checkpoint: str | Path) -> dict[str, Any] | None:
    """Attributes of one training feature file of the run ``checkpoint`` came from.

    Best effort: None when the run's ``config.yaml`` or its ``h5_folder`` features
    cannot be found.
    """
    import yaml

    from tiahnm.slides.store import read_attrs
    from tiahnm.utils.safe_yaml import safe_load

    path = Path(checkpoint)
    for run in (path, *path.parents[:3]):
        cfg_path = run / "config.yaml"
        if cfg_path.is_file():
            break
    else:
        return None
    try:
        cfg = safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    data = cfg.get("data") or {}
    folder = (data.get("options") or {}).get("features_dir")
    if data.get("source") != "h5_folder" or not folder or not Path(folder).is_dir():
        return None
    for h5 in sorted(Path(folder).glob("*.h5")):
        attrs = read_attrs(h5)
        if attrs is not None:
            return attrs
    return None


def _differences(train: dict[str, Any] | None, here: dict[str, Any] | None) -> str:
    if not train or not here:
        return ""
    diffs = [
        f"{k} {here.get(k)!r} (training: {train.get(k)!r})"
        for k in COMPARED_SETTINGS
        if k in train and k in here and train[k] != here[k]
    ]
    return "; ".join(diffs)


def predict_slides(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    extract_cfg: ExtractConfig | None = None,
    features_dir: str | Path | None = None,
    device: str = "auto",
    on_result: Callable[[str, str, str], None] | None = None,
) -> PredictSummary:
    """Predict slides (images, or ``.h5`` feature files) with a checkpoint or a run.

    Writes in ``output_dir``: ``predictions.csv`` (slide_id, probability,
    prediction, n_patches), ``instance_scores.h5`` (for ``tiahnm heatmap``),
    ``failures.csv`` (slide, error; header only when none failed) and
    ``predict_summary.json``.

    Args:
        checkpoint (str | Path): A fold's ``best.pt``, or a training run folder: then
            every ``folds/*/best.pt`` is used and their probabilities averaged (an
            ensemble, thresholded at the mean of the fold thresholds).
        inputs (Sequence[str | Path]): Slide files, ``.h5`` feature files, or folders
            of either.
        output_dir (str | Path): Output folder (created).
        extract_cfg (ExtractConfig | None): Encoder and tiling settings for slides
            that need features (those of the training features!). Default:
            ``tiahnm extract``'s defaults.
        features_dir (str | Path | None): Where extracted features go (default
            ``output_dir/features``); finished slides there are reused.
        device (str): Device of the heads (``auto``, ``cpu``, ``cuda`` ...).
        on_result (Callable | None): Called as ``(slide, status, message)`` per slide.

    Returns:
        PredictSummary: Predictions and failures.

    Raises:
        DataError: The checkpoint is unusable.
        ConfigError / PluginError: Bad encoder settings.
    """
    from tiahnm.runtime.device import resolve_device
    from tiahnm.slides.extract import ExtractConfig

    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device, "--device")
    ens = _Ensemble.load(checkpoint, dev)
    notify = on_result or (lambda *_: None)
    h5s, failures = _feature_files(
        inputs, extract_cfg or ExtractConfig(), out, features_dir, notify
    )
    train_attrs = training_feature_attrs(checkpoint)
    warned: list[str] = []
    predictions: list[Prediction] = []
    scored: list[SlideScores] = []
    seen: dict[str, Path] = {}
    for path in h5s:
        try:
            done = _predict_file(ens, path, seen, train_attrs, warned)
        except Exception as exc:  # one bad slide must not stop the others
            error = (
                str(exc)
                if isinstance(exc, DataError)
                else f"{type(exc).__name__}: {exc}"
            )
            logger.debug("predicting %s failed", path, exc_info=True)
            failures.append((str(path), error))
            notify(str(path), "failed", error)
            continue
        row = _prediction(ens, *done, path, scored)
        predictions.append(row)
        notify(
            row.slide_id,
            "done",
            f"{ens.task.score_name} {row.probability:.3f}, prediction "
            f"{row.prediction}, {row.n_patches} patches",
        )
    result = PredictSummary(
        predictions=predictions,
        failures=failures,
        output_dir=out,
        checkpoints=[str(h.path) for h in ens.heads],
        threshold=ens.threshold,
        warnings=[f"features differ from the training features: {d}" for d in warned],
    )
    _write_outputs(ens, result, scored, start)
    return result


@dataclass
class _Ensemble:
    """The heads of a checkpoint or run, their task, device and mean thresholds."""

    heads: list[LoadedHead]
    device: torch.device
    task: Any
    threshold: float
    instance_threshold: float

    @classmethod
    def load(cls, checkpoint: str | Path, device: torch.device) -> _Ensemble:
        """Every head of ``checkpoint`` (:func:`load_heads`) on ``device``."""
        heads = load_heads(checkpoint, device)
        return cls(
            heads,
            device,
            heads_task(heads),
            float(np.mean([h.threshold for h in heads])),
            float(np.mean([h.instance_threshold for h in heads])),
        )


def _feature_files(
    inputs: Sequence[str | Path],
    cfg: ExtractConfig,
    out: Path,
    features_dir: str | Path | None,
    notify: Callable[[str, str, str], None],
) -> tuple[list[Path], list[tuple[str, str]]]:
    """The feature files of ``inputs`` (slides extracted first) and the failures."""
    from tiahnm.slides.extract import extract_features

    h5s, slides, failures = _split_inputs(inputs, cfg.suffixes)
    for item, error in failures:
        notify(item, "failed", error)
    if slides:
        feat_dir = Path(features_dir) if features_dir else out / "features"
        summary = extract_features(slides, feat_dir, cfg)
        for r in summary.results:
            if r.status == "failed":
                failures.append((r.path, r.error))
                notify(r.path, "failed", r.error)
            else:
                h5s.append(Path(r.output) if r.output else feat_dir / f"{r.slide}.h5")
    return h5s, failures


def _predict_file(
    ens: _Ensemble,
    path: Path,
    seen: dict[str, Path],
    train_attrs: dict[str, Any] | None,
    warned: list[str],
) -> tuple[str, Any, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read one feature file and run the ensemble on it.

    Returns ``(slide id, arrays, outputs, instance scores, class scores)``; a settings
    difference from the training features is warned about once (kept in ``warned``).

    Raises:
        DataError: A duplicate slide id, an unreadable file or a width mismatch.
    """
    import torch

    from tiahnm.slides.reader import slide_id
    from tiahnm.slides.store import read_attrs, read_feature_arrays

    sid = slide_id(path)
    if sid in seen:
        msg = f"duplicate slide id {sid!r} (also {seen[sid]}); rename one."
        raise DataError(msg)
    seen[sid] = path
    arrays = read_feature_arrays(path)
    diff = _differences(train_attrs, read_attrs(path))
    if diff and diff not in warned:
        warned.append(diff)
        logger.warning("%s: features differ from the training features: %s.", sid, diff)
    outputs, scores, class_scores = ensemble_predict(
        ens.heads, torch.from_numpy(arrays.features), ens.device, ens.task
    )
    return sid, arrays, outputs, scores, class_scores


def _prediction(
    ens: _Ensemble,
    sid: str,
    arrays: Any,
    outputs: np.ndarray,
    scores: np.ndarray | None,
    class_scores: np.ndarray | None,
    path: Path,
    scored: list[SlideScores],
) -> Prediction:
    """The slide's row of ``predictions.csv``; its instance scores go to ``scored``."""
    task = ens.task
    cols = task.output_columns(outputs, ens.threshold)
    p = float(task.score(outputs.reshape(1, -1))[0])
    pred = int(task.predicted_labels(outputs.reshape(1, -1), ens.threshold)[0])
    n = int(arrays.features.shape[0])
    if scores is not None:
        from tiahnm.evaluation.scores import feature_file_meta

        scored.append(
            SlideScores(
                slide_id=sid,
                scores=np.asarray(scores, dtype=np.float32),
                coords=arrays.coords,
                instance_labels=arrays.instance_labels,
                probability=p,
                prediction=pred,
                meta=feature_file_meta(path),
                class_scores=class_scores,
            )
        )
    return Prediction(sid, p, pred, n, cols)


def _write_outputs(
    ens: _Ensemble, result: PredictSummary, scored: list[SlideScores], start: float
) -> None:
    """``predictions.csv``, ``failures.csv``, ``instance_scores.h5``, the summary.

    ``result.seconds`` is set from ``start`` once the scores are written.
    """
    out, heads = result.output_dir, ens.heads
    write_prediction_rows(out / "predictions.csv", result.predictions)
    write_failures(out / "failures.csv", result.failures)
    write_instance_scores(
        out / SCORES_FILE,
        scored,
        {
            "slide_score": ens.task.score_name,
            "score_kind": heads[0].head.default_eval_score,
            "head": type(heads[0].head).__name__,
            "threshold": ens.threshold,
            "instance_threshold": ens.instance_threshold,
            "checkpoints": [str(h.path) for h in heads],
            "val_reference": json.dumps(_fold_references(heads)),
        },
    )
    result.seconds = time.perf_counter() - start
    write_json(
        out / "predict_summary.json",
        {
            "checkpoints": result.checkpoints,
            "ensemble": len(heads) > 1,
            "task": ens.task.spec(),
            "threshold": ens.threshold,
            "instance_threshold": ens.instance_threshold,
            "n_predicted": len(result.predictions),
            "n_failed": len(result.failures),
            "warnings": result.warnings,
            "seconds": round(result.seconds, 3),
        },
    )


def _fold_references(heads: Sequence[Any]) -> dict[str, Any] | None:
    """Mean validation reference of the heads' folds (their ``instance_scores.h5``)."""
    import h5py

    from tiahnm.evaluation.reference import mean_reference, parse_reference

    refs = []
    for h in heads:
        path = Path(h.path).parent / SCORES_FILE
        try:
            with h5py.File(path, "r") as f:
                refs.append(parse_reference(_attr_text(f.attrs.get("val_reference"))))
        except (OSError, ValueError):
            continue
    return mean_reference(refs)


def _attr_text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def write_prediction_rows(path: str | Path, predictions: Sequence[Prediction]) -> Path:
    """``predictions.csv``: slide_id, the task's columns, n_patches (atomic).

    Binary heads: ``slide_id, probability, prediction, n_patches``; multi-class adds
    ``p_<k>``; survival has ``risk, high_risk`` instead.
    """
    columns: list[str] = []
    for r in predictions:
        columns += [k for k in r.columns if k not in columns]
    if not predictions:
        columns = ["probability", "prediction"]
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", *columns, "n_patches"])
        for r in predictions:
            values = [r.columns.get(k, "") for k in columns]
            w.writerow(
                [
                    r.slide_id,
                    *[f"{v:.6f}" if isinstance(v, float) else v for v in values],
                    r.n_patches,
                ]
            )
    return Path(path)


def write_failures(path: str | Path, failures: Sequence[tuple[str, str]]) -> Path:
    """``slide,error`` rows (header only when none failed), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide", "error"])
    w.writerows(failures)
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write(buf.getvalue())
    return Path(path)


__all__ = [
    "LoadedHead",
    "PredictSummary",
    "Prediction",
    "checkpoint_paths",
    "ensemble_predict",
    "heads_task",
    "load_heads",
    "predict_slides",
    "training_feature_attrs",
]
