"""Per-slide instance scores on disk (``instance_scores.h5``), for heatmaps.

Layout: one group per slide (its name is the slide id with ``%`` and ``/`` escaped;
the ``slide_id`` attribute holds the id itself) with

* ``scores``: ``[N]`` float32, the head's ``default_eval_score`` per patch;
* ``coords``: ``[N, 2]`` int64 top-left corners in level-0 pixels, when known;
* ``instance_labels``: ``[N]`` int8, when the bag has patch labels;
* ``class_scores``: ``[N, C]`` float32 per-class instance probabilities, for heads
  with more than 2 classes that give them (``tiahnm heatmap --class K``);
* attributes ``slide_id``, ``label`` (-1 when unknown; the event for survival),
  ``probability`` (the task's slide score: positive-class or top-class
  probability, or the risk for survival; file attribute ``slide_score`` names it),
  ``prediction`` (class, or 1 for the high-risk group), ``patient_id`` for slides
  of a patient-level bag (each of its slides is stored on its own), and when the bag came from a feature file written by ``tiahnm
  extract``: ``source`` (that file), ``slide_path``, ``level0_dimensions``,
  ``patch_size_level0``, ``level0_mpp``.

File attributes: ``score_kind``, ``threshold`` (slide), ``instance_threshold``,
``head``. Written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tiahnm.errors import DataError
from tiahnm.utils.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.data.bag import Bag

SCORES_FILE = "instance_scores.h5"


@dataclass
class SlideScores:
    """Instance scores of one slide.

    Attributes:
        slide_id (str): Slide id.
        scores (np.ndarray): ``[N]`` instance scores.
        coords (np.ndarray | None): ``[N, 2]`` level-0 top-left corners.
        instance_labels (np.ndarray | None): ``[N]`` patch labels, if known.
        label (int): Slide label (-1: unknown).
        probability (float): Slide probability (positive class; max for multi-class).
        prediction (int): Slide prediction at the stored threshold.
        meta (dict): ``source``, ``slide_path``, ``level0_dimensions``,
            ``patch_size_level0``, ``level0_mpp``, ``patient_id`` when known.
        class_scores (np.ndarray | None): ``[N, C]`` per-class instance scores.
    """

    slide_id: str
    scores: np.ndarray
    coords: np.ndarray | None = None
    instance_labels: np.ndarray | None = None
    label: int = -1
    probability: float = float("nan")
    prediction: int = -1
    meta: dict[str, Any] = field(default_factory=dict)
    class_scores: np.ndarray | None = None


def _group_name(slide_id: str) -> str:
    return slide_id.replace("%", "%25").replace("/", "%2F") or "%"


def feature_file_meta(source: str | Path | None) -> dict[str, Any]:
    """Slide facts recorded in a ``tiahnm extract`` feature file (``{}`` if none).

    Args:
        source (str | Path | None): The feature file a bag came from.

    Returns:
        dict: ``source``, ``slide_path``, ``level0_dimensions``,
        ``patch_size_level0``, ``level0_mpp`` (those present).
    """
    if not source or not str(source).endswith(".h5") or not Path(source).is_file():
        return {}
    import h5py

    out: dict[str, Any] = {"source": str(source)}
    try:
        with h5py.File(source, "r") as f:
            attrs = f.attrs
            for key in ("slide_path", "level0_dimensions", "level0_mpp"):
                if key in attrs:
                    out[key] = _plain(attrs[key])
            if "coords" in f and "patch_size_level0" in f["coords"].attrs:
                out["patch_size_level0"] = _plain(
                    f["coords"].attrs["patch_size_level0"]
                )
    except (OSError, ValueError, KeyError):
        return {"source": str(source)}
    return {k: v for k, v in out.items() if v not in ("", None)}


def _patch_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The level-0 patch size a bag source recorded (foreign layouts), if any."""
    return {k: meta[k] for k in ("patch_size_level0",) if k in meta}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def scores_from_bags(
    bags: Sequence[Bag],
    scores: Sequence[np.ndarray],
    probs: np.ndarray,
    threshold: float,
    *,
    with_labels: bool = True,
    task: Any = None,
    class_scores: Sequence[np.ndarray] | None = None,
) -> list[SlideScores]:
    """:class:`SlideScores` of predicted bags.

    A patient-level bag (``meta["slide_ids"]``, ``meta["instance_slide"]``) gives one
    entry per slide, each with its own instances and coordinates, so heatmaps are
    drawn per slide.

    Args:
        bags (Sequence[Bag]): The bags.
        scores (Sequence[np.ndarray]): Their instance scores.
        probs (np.ndarray): ``[n, C]`` slide outputs of the task.
        threshold (float): Slide threshold (binary) or risk-group cut (survival).
        with_labels (bool): Keep the bags' labels (False for unlabelled slides).
        task (Task | None): Gives the slide score and decision (default: binary or
            multiclass by the width of ``probs``).
        class_scores (Sequence[np.ndarray] | None): ``[N, C]`` per bag.
    """
    if task is None:
        from tiahnm.tasks import default_task

        task = default_task(probs.shape[1] if probs.ndim == 2 else 2)
    slide_score = task.score(probs) if len(bags) else np.zeros(0)
    decision = task.predicted_labels(probs, threshold) if len(bags) else slide_score
    out = []
    for i, (bag, s) in enumerate(zip(bags, scores, strict=True)):
        entry = SlideScores(
            slide_id=bag.slide_id,
            scores=np.asarray(s, dtype=np.float32).reshape(-1),
            coords=None if bag.coords is None else np.asarray(bag.coords),
            instance_labels=None
            if bag.instance_labels is None
            else np.asarray(bag.instance_labels),
            label=task.target(bag) if with_labels else -1,
            probability=float(slide_score[i]),
            prediction=int(decision[i]),
            meta={**feature_file_meta(bag.source), **_patch_meta(bag.meta)},
            class_scores=None if class_scores is None else class_scores[i],
        )
        out.extend(split_patient_entry(entry, bag.meta))
    return out


def split_patient_entry(
    entry: SlideScores, meta: Mapping[str, Any]
) -> list[SlideScores]:
    """One entry per slide of a patient-level bag (``[entry]`` for a slide bag)."""
    ids = meta.get("slide_ids")
    which = meta.get("instance_slide")
    if not ids or which is None:
        return [entry]
    which = np.asarray(which)
    sources = list(meta.get("slide_sources") or [None] * len(ids))
    out = []
    for j, sid in enumerate(ids):
        keep = which == j

        def part(a: np.ndarray | None, keep: np.ndarray = keep) -> np.ndarray | None:
            return None if a is None else np.asarray(a)[keep]

        out.append(
            replace(
                entry,
                slide_id=str(sid),
                scores=entry.scores[keep],
                coords=part(entry.coords),
                instance_labels=part(entry.instance_labels),
                class_scores=part(entry.class_scores),
                meta={
                    **feature_file_meta(sources[j]),
                    **_patch_meta(meta),
                    "patient_id": entry.slide_id,
                },
            )
        )
    return out


def write_instance_scores(
    path: str | Path,
    slides: Sequence[SlideScores],
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``slides`` to ``path`` atomically (see the module docstring)."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in (attrs or {}).items():
            f.attrs[key] = _attr(value)
        for s in slides:
            g = f.create_group(_group_name(s.slide_id))
            _dataset(g, "scores", np.asarray(s.scores, dtype=np.float32))
            if s.coords is not None:
                _dataset(g, "coords", np.asarray(s.coords, dtype=np.int64))
            if s.instance_labels is not None:
                _dataset(g, "instance_labels", np.asarray(s.instance_labels, np.int8))
            if s.class_scores is not None:
                _dataset(g, "class_scores", np.asarray(s.class_scores, np.float32))
            g.attrs["slide_id"] = s.slide_id
            g.attrs["label"] = int(s.label)
            g.attrs["probability"] = float(s.probability)
            g.attrs["prediction"] = int(s.prediction)
            for key, value in s.meta.items():
                g.attrs[key] = _attr(value)
    return path


def _dataset(group: Any, name: str, data: np.ndarray) -> None:
    """A dataset, compressed (fast gzip) when it is large (big slides)."""
    if data.size > 4096:
        group.create_dataset(
            name, data=data, compression="gzip", compression_opts=1, shuffle=True
        )
    else:
        group.create_dataset(name, data=data)


def _attr(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, Path):
        return str(value)
    return value


def read_instance_scores(
    path: str | Path,
) -> tuple[list[SlideScores], dict[str, Any]]:
    """Read a file written by :func:`write_instance_scores`.

    Returns:
        tuple: ``(slides, file attributes)``.

    Raises:
        DataError: The file is missing or not an instance-scores file.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        msg = f"{path}: instance scores file not found."
        raise DataError(msg)
    slides = []
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            for name in f:
                g = f[name]
                if "scores" not in g:
                    continue
                a = {k: _plain(v) for k, v in g.attrs.items()}
                meta_keys = (
                    "source",
                    "slide_path",
                    "level0_dimensions",
                    "patch_size_level0",
                    "level0_mpp",
                    "patient_id",
                )
                slides.append(
                    SlideScores(
                        slide_id=str(a.get("slide_id", name)),
                        scores=_read(path, g, "scores").astype(np.float32),
                        coords=_read(path, g, "coords") if "coords" in g else None,
                        instance_labels=_read(path, g, "instance_labels")
                        if "instance_labels" in g
                        else None,
                        label=int(a.get("label", -1)),
                        probability=float(a.get("probability", float("nan"))),
                        prediction=int(a.get("prediction", -1)),
                        meta={k: a[k] for k in meta_keys if a.get(k) not in (None, "")},
                        class_scores=np.asarray(g["class_scores"][()], np.float32)
                        if "class_scores" in g
                        else None,
                    )
                )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = f"{path}: unreadable instance scores file ({exc})."
        raise DataError(msg) from None
    for slide in slides:
        check_slide_scores(path, slide)
    return slides, attrs


def _read(path: Path, group: Any, name: str) -> np.ndarray:
    """One dataset of a slide group: no links or external storage, size checked."""
    from tiahnm.slides.store import check_size, safe_dataset

    node = safe_dataset(path, group, name)
    check_size(path, f"{group.name}/{name}", node)
    return np.asarray(node[()])


def check_slide_scores(path: Path, slide: SlideScores) -> None:
    """Refuse a malformed slide entry (shapes, sizes), naming the file and slide."""
    where = f"{path}: slide {slide.slide_id!r}"
    n = slide.scores.shape[0] if slide.scores.ndim >= 1 else -1
    problems = []
    if slide.scores.ndim != 1 or n == 0:
        problems.append(
            f"'scores' must be a non-empty [N] array, got {slide.scores.shape}"
        )
    if slide.coords is not None and (
        slide.coords.ndim != 2 or slide.coords.shape != (n, 2)
    ):
        problems.append(
            f"'coords' shape {slide.coords.shape} does not match {n} scores"
        )
    if slide.coords is not None and not np.isfinite(slide.coords).all():
        problems.append("'coords' has NaN/inf")
    for key in ("patch_size_level0", "level0_dimensions"):
        value = slide.meta.get(key)
        if value is None:
            continue
        try:
            arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError):
            arr = np.asarray([np.nan])
        if arr.size not in (1, 2) or not np.isfinite(arr).all() or (arr <= 0).any():
            problems.append(f"attribute {key}={value!r} must be positive sizes")
    if problems:
        raise DataError(f"{where}: malformed instance scores ({'; '.join(problems)}).")


def find_score_files(path: str | Path) -> list[Path]:
    """Instance-score files in ``path``.

    Args:
        path (str | Path): An ``instance_scores.h5`` file, a folder holding one (a
            fold folder, a ``tiahnm predict`` output), or a run folder (every
            ``folds/*/instance_scores.h5``).

    Returns:
        list[Path]: The files, sorted.

    Raises:
        DataError: None found.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    found = []
    if (path / SCORES_FILE).is_file():
        found.append(path / SCORES_FILE)
    found += sorted(path.glob(f"folds/*/{SCORES_FILE}"))
    if not found:
        msg = (
            f"{path}: no {SCORES_FILE} (give the file, a fold folder, a `tiahnm "
            "predict` output folder or a run folder)."
        )
        raise DataError(msg)
    return found


__all__ = [
    "SCORES_FILE",
    "SlideScores",
    "feature_file_meta",
    "find_score_files",
    "read_instance_scores",
    "scores_from_bags",
    "write_instance_scores",
]
