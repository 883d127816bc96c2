"""Checks around cross-validated training: divergence, damaged results, one class."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tiahnm.data.bag import Bag
from tiahnm.errors import DataError, TrainingDivergedError

logger = logging.getLogger(__name__)

#: An epoch's training loss this many times the first epoch's (and above
#: :data:`GROWTH_FLOOR`) is reported as divergence.
GROWTH_WARN = 1e3
GROWTH_FLOOR = 1e3


def diverged(
    fold_name: str, fold_dir: Path, exc: TrainingDivergedError
) -> TrainingDivergedError:
    """The error for a fold whose loss became NaN/inf, naming what was kept."""
    last = fold_dir / "last.pt"
    kept = (
        f"the last good checkpoint {last} is kept"
        if last.is_file()
        else "no checkpoint was written before it"
    )
    return TrainingDivergedError(f"fold {fold_name}: {exc} Training stopped; {kept}.")


def watch_divergence(
    fold_name: str, on_epoch_end: Callable[[dict[str, float]], None] | None
) -> Callable[[dict[str, float]], None]:
    """Wrap an epoch callback so a training loss that explodes is warned about once."""
    first: list[float] = []
    warned: list[bool] = []

    def callback(row: dict[str, float]) -> None:
        loss = float(row.get("train_loss", math.nan))
        if not first and math.isfinite(loss):
            first.append(abs(loss))
        elif (
            first
            and not warned
            and loss > GROWTH_FLOOR
            and loss > GROWTH_WARN * max(first[0], 1e-12)
        ):
            warned.append(True)
            logger.warning(
                "fold %s, epoch %d: training loss %.3g is %.0fx the first epoch's "
                "(%.3g); training is diverging (train.lr too large?).",
                fold_name,
                int(row.get("epoch", -1)),
                loss,
                loss / max(first[0], 1e-12),
                first[0],
            )
        if on_epoch_end is not None:
            on_epoch_end(row)

    return callback


def read_json_result(path: Path) -> dict[str, Any] | None:
    """A finished fold's ``result.json``, or None when absent or damaged.

    A truncated or otherwise unreadable file (disk full, a copy cut short) is moved
    aside to ``<name>.damaged`` and the fold is recomputed (training is
    deterministic, so the result is the same).
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        data, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "not a JSON object with the fold's results"
    if isinstance(data, dict) and "metrics" in data and "predictions" in data:
        return data
    damaged = path.with_name(path.name + ".damaged")
    path.replace(damaged)
    logger.warning(
        "%s: damaged (%s); moved to %s and recomputed.", path, why, damaged.name
    )
    return None


#: Keys that do not change a run's results (left out of its fingerprint).
_RUNTIME = {
    "train": (
        "progress",
        "device",
        "num_threads",
        "checkpoint_every",
        "prefetch",
        "loader_workers",
        "pin_memory",
    ),
    "evaluation": ("report", "heatmaps"),
}


def run_fingerprint(config: Any) -> str:
    """A short hash of the settings a run's results depend on (stored in best.pt)."""
    import hashlib

    d = config.to_dict()
    d.pop("output_dir", None)
    for section, keys in _RUNTIME.items():
        d[section] = {k: v for k, v in d[section].items() if k not in keys}
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_classes(bags: Sequence[Bag], source: str) -> None:
    """Refuse data with a single class (nothing to learn, AUC undefined)."""
    present = sorted({b.label for b in bags})
    if len(present) < 2:
        msg = (
            f"data source {source!r}: every one of the {len(bags)} bags has label "
            f"{present[0] if present else '?'}; training needs at least two classes "
            "(check the labels CSV)."
        )
        raise DataError(msg)
