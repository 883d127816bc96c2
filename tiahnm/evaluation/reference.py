"""The validation reference of patch scores, and the run facts heatmaps need.

A raw patch score means little on its own: attention-head CAM probabilities of a
normal slide can sit at 0.49-0.54 around the head's bias, and a fixed 0.5 cut then
paints the whole slide. Each fold therefore stores, with its test instance scores,
the percentiles of the patch scores of its *validation* slides, split by slide label
(:func:`validation_reference`). The ``validation`` colour scale
(:func:`tiahnm.evaluation.heatmap.scale_scores`) paints a patch only when it scores
strictly above every patch of the negative validation slides (``REFERENCE_LOW``: the
100th percentile; many patches share the score at the head's bias, so a tie at the
cut-off is not painted), and reaches the top of the colour bar at the
``REFERENCE_HIGH`` th percentile of the patches of positive ones. Test slides are not
looked at.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.data.bag import Bag

#: Percentile of negative validation patches where painting starts (100: their
#: highest score; lower percentiles left many patches of normal test slides painted
#: on the demo, whose scores differ from slide to slide by more than within one).
REFERENCE_LOW = 100
#: Percentile of positive validation patches at the top of the colour bar.
REFERENCE_HIGH = 99


def validation_reference(
    bags: Sequence[Bag], scores: Sequence[np.ndarray] | None
) -> dict[str, Any] | None:
    """Percentiles 0-100 of validation patch scores, per slide label (binary).

    Args:
        bags (Sequence[Bag]): Validation bags.
        scores (Sequence[np.ndarray] | None): Their instance scores.

    Returns:
        dict | None: ``{"negative": [101 floats] | None, "positive": ... ,
        "n_negative": patches, "n_positive": patches}``; None without validation
        scores or without a negative validation slide.
    """
    if not bags or scores is None:
        return None
    pools: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for bag, s in zip(bags, scores, strict=True):
        if bag.label in pools:
            values = np.asarray(s, dtype=np.float64).reshape(-1)[: bag.n_instances]
            pools[bag.label].append(values[np.isfinite(values)])
    out: dict[str, Any] = {}
    for label, name in ((0, "negative"), (1, "positive")):
        values = np.concatenate([np.zeros(0), *pools[label]])
        out[f"n_{name}"] = int(values.size)
        out[name] = (
            np.percentile(values, np.arange(101)).tolist()  # exact: ties stay ties
            if values.size
            else None
        )
    return out if out["negative"] else None


def reference_range(reference: dict[str, Any] | None) -> tuple[float, float] | None:
    """``(low, high)`` raw scores of the ``validation`` colour scale, or None."""
    if not reference or not reference.get("negative"):
        return None
    low = float(reference["negative"][REFERENCE_LOW])
    top = reference.get("positive") or reference["negative"]
    high = float(top[REFERENCE_HIGH])
    if high <= low:  # positives no higher than negatives: the negatives' maximum
        high = max(float(reference["negative"][100]), low)
    if high <= low:
        high = low + 1e-6
    return low, high


def mean_reference(refs: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Percentile-wise mean of several folds' references (an ensemble's scores)."""
    refs = [r for r in refs if r and r.get("negative")]
    if not refs:
        return None
    out: dict[str, Any] = {}
    for name in ("negative", "positive"):
        parts = [r[name] for r in refs if r.get(name)]
        out[name] = np.mean(parts, axis=0).tolist() if parts else None
        out[f"n_{name}"] = int(sum(r.get(f"n_{name}", 0) for r in refs))
    return out


def parse_reference(value: Any) -> dict[str, Any] | None:
    """A reference stored as an HDF5 attribute (JSON text or already decoded)."""
    if isinstance(value, str):
        if not value:
            return None
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) and value.get("negative") else None


def find_run_config(path: str | Path) -> dict[str, Any]:
    """The ``config.yaml`` of the run ``path`` belongs to (``{}`` if none).

    ``path`` may be the run folder, a fold folder, an ``instance_scores.h5`` or a
    ``tiahnm predict`` output (whose ``predict_summary.json`` names the checkpoints).
    """
    import yaml

    start = Path(path)
    candidates = [start, *list(start.parents)[:3]]
    summary = (start if start.is_dir() else start.parent) / "predict_summary.json"
    if summary.is_file():
        try:
            ckpts = json.loads(summary.read_text(encoding="utf-8")).get("checkpoints")
        except (OSError, ValueError):
            ckpts = None
        for c in ckpts or []:
            candidates += list(Path(c).parents)[:3]
    for folder in candidates:
        cfg = folder / "config.yaml"
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                return data
    return {}


def class_names_from_config(cfg: dict[str, Any]) -> dict[int, str] | None:
    """``{index: name}`` from ``data.options.classes`` of a run config."""
    names = ((cfg.get("data") or {}).get("options") or {}).get("classes")
    if isinstance(names, list) and names:
        return {i: str(n) for i, n in enumerate(names)}
    return None


__all__ = [
    "REFERENCE_HIGH",
    "REFERENCE_LOW",
    "class_names_from_config",
    "find_run_config",
    "mean_reference",
    "parse_reference",
    "reference_range",
    "validation_reference",
]
