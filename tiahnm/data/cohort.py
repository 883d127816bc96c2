"""Cohort columns of a labels CSV: patient, survival time and event.

Bag sources with a labels CSV (``h5_folder``, ``image_patches``, ``slide_patches``)
call :func:`read_cohort_columns` and :func:`apply_cohort`; every bad value is a
:class:`~tiahnm.errors.DataError` naming the file, row and column. A patient column
is looked up by name (``patient_column``, default ``patient_id``; ``case_id`` is
also accepted); survival columns (``time_column``, ``event_column``) are read when
present.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tiahnm.data.bag import Bag
from tiahnm.errors import DataError

#: Patient columns tried when ``patient_column`` is the default and absent.
PATIENT_ALIASES = ("patient_id", "case_id")


@dataclass(frozen=True)
class CohortRow:
    """The cohort columns of one CSV row."""

    row: int
    patient_id: str | None = None
    time: float | None = None
    event: int | None = None
    target: float | None = None


def read_cohort_columns(
    path: str | Path,
    *,
    key_column: str = "slide_id",
    patient_column: str = "patient_id",
    time_column: str = "time",
    event_column: str = "event",
    target_column: str = "target",
) -> dict[str, CohortRow]:
    """Cohort columns per key (slide id or image name) of a labels CSV.

    Args:
        path (str | Path): The labels CSV.
        key_column (str): Column naming the bag.
        patient_column (str): Patient column (``case_id`` also accepted when this is
            ``patient_id`` and absent).
        time_column (str): Survival time column (read when present).
        event_column (str): Event column, 0/1 (read when present).
        target_column (str): Continuous regression target (read when present).

    Returns:
        dict[str, CohortRow]: By key; empty columns are None.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        patient = _patient_column(fields, patient_column)
        has_time, has_event = time_column in fields, event_column in fields
        has_target = target_column in fields
        if has_time != has_event:
            missing = event_column if has_time else time_column
            msg = f"{path}: survival needs both columns; {missing!r} is missing."
            raise DataError(msg)
        out: dict[str, CohortRow] = {}
        for lineno, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            key = row.get(key_column, "")
            pid = None
            if patient is not None:
                pid = row.get(patient, "")
                if not pid:
                    msg = f"{path}, row {lineno}: empty {patient!r} for {key!r}."
                    raise DataError(msg)
            time = event = None
            if has_time:
                time = _time(path, lineno, time_column, row.get(time_column, ""))
                event = _event(path, lineno, event_column, row.get(event_column, ""))
            target = None
            if has_target:
                target = _finite(
                    path, lineno, target_column, row.get(target_column, "")
                )
            out[key] = CohortRow(lineno, pid, time, event, target)
    return out


def _patient_column(fields: Sequence[str], name: str) -> str | None:
    if name in fields:
        return name
    if name == PATIENT_ALIASES[0]:
        return next((a for a in PATIENT_ALIASES if a in fields), None)
    return None


def _time(path: Path, lineno: int, column: str, value: str) -> float:
    try:
        time = float(value)
    except ValueError:
        time = math.nan
    if not value or not math.isfinite(time) or time < 0:
        msg = (
            f"{path}, row {lineno}: {column!r} = {value!r} must be a finite time >= 0."
        )
        raise DataError(msg)
    return time


def _finite(path: Path, lineno: int, column: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        msg = f"{path}, row {lineno}: {column!r} = {value!r} must be a finite number."
        raise DataError(msg)
    return number


def _event(path: Path, lineno: int, column: str, value: str) -> int:
    if value not in ("0", "1", "0.0", "1.0"):
        msg = f"{path}, row {lineno}: {column!r} = {value!r} must be 0 or 1."
        raise DataError(msg)
    return int(float(value))


def apply_cohort(
    bag: Bag, rows: dict[str, CohortRow], key: str, path: str | Path
) -> Bag:
    """Set ``bag``'s patient, time and event from its CSV row (in place)."""
    row = rows.get(key)
    if row is None:
        return bag
    bag.patient_id, bag.time, bag.event = row.patient_id, row.time, row.event
    bag.target = row.target
    bag.meta["labels_csv"] = str(path)
    bag.meta["row"] = row.row
    return bag


def check_patient_labels(bags: Sequence[Bag]) -> None:
    """DataError naming the patient and rows when a patient's bags disagree."""
    seen: dict[str, Bag] = {}
    for b in bags:
        if not b.patient_id:
            continue
        first = seen.setdefault(b.patient_id, b)
        facts = (first.label, first.time, first.event, first.target)
        if facts != (b.label, b.time, b.event, b.target):
            where = b.meta.get("labels_csv", b.source or "data")
            msg = (
                f"{where}: patient {b.patient_id!r} has conflicting labels: slide "
                f"{first.slide_id!r} (row {first.meta.get('row', '?')}) and slide "
                f"{b.slide_id!r} (row {b.meta.get('row', '?')})."
            )
            raise DataError(msg)


def patient_bags(bags: Sequence[Bag]) -> list[Bag]:
    """One bag per patient: its slides' instances concatenated.

    Each instance keeps its slide (``meta["instance_slide"]``, an index into
    ``meta["slide_ids"]``) and coordinates, so scores can be drawn per slide.
    Bags without a patient stay as they are.
    """
    groups: dict[str, list[Bag]] = {}
    for b in bags:
        groups.setdefault(b.patient_id or f"\0{b.slide_id}", []).append(b)
    out = []
    for key, members in groups.items():
        if key.startswith("\0"):
            out.extend(members)
            continue
        out.append(_merge(key, members))
    return out


def _merge(patient: str, members: Sequence[Bag]) -> Bag:
    first = members[0]
    coords = None
    if all(b.coords is not None for b in members):
        coords = np.concatenate([np.asarray(b.coords) for b in members])
    inst = None
    if all(b.instance_labels is not None for b in members):
        inst = np.concatenate([np.asarray(b.instance_labels) for b in members])
    which = np.concatenate(
        [np.full(b.n_instances, i, dtype=np.int64) for i, b in enumerate(members)]
    )
    return replace(
        first,
        slide_id=patient,
        features=torch.cat([b.features for b in members]),
        coords=coords,
        instance_labels=inst,
        meta={
            "slide_ids": [b.slide_id for b in members],
            "instance_slide": which,
            "slide_sources": [b.source for b in members],
            "row": first.meta.get("row"),
            "labels_csv": first.meta.get("labels_csv"),
            "class_name": first.meta.get("class_name"),
        },
    )


__all__ = [
    "CohortRow",
    "apply_cohort",
    "check_patient_labels",
    "patient_bags",
    "read_cohort_columns",
]
