"""Stratified k-fold cross-validation with repeats and a validation hold-out."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiahnm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fold:
    """Indices (into the bag list) of one train/val/test split."""

    repeat: int
    fold: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    @property
    def name(self) -> str:
        """``r{repeat}_f{fold}``."""
        return f"r{self.repeat}_f{self.fold}"


def _holdout(
    indices: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified hold-out: at least one bag of each class when possible."""
    if fraction <= 0:
        return indices, indices[:0]
    val = []
    for c in np.unique(labels[indices]):
        members = indices[labels[indices] == c]
        members = members[rng.permutation(len(members))]
        n = round(fraction * len(members))
        n = max(1, n) if len(members) > 1 else 0
        val.extend(members[:n].tolist())
    val_arr = np.asarray(sorted(val), dtype=np.int64)
    train = np.setdiff1d(indices, val_arr)
    return train, val_arr


def kfold_splits(
    labels: Sequence[int],
    *,
    folds: int,
    repeats: int,
    val_fraction: float,
    seed: int,
    groups: Sequence[str | None] | None = None,
) -> list[Fold]:
    """Repeated stratified k-fold; each training part keeps a stratified validation set.

    The test fold never contributes to training, validation, early stopping or
    thresholds. With ``groups`` (patient ids; None for a bag of its own) the folds
    and the validation hold-out are grouped: see :func:`grouped_kfold_splits`.
    """
    if groups is not None and any(g for g in groups):
        return grouped_kfold_splits(
            labels,
            groups,
            folds=folds,
            repeats=repeats,
            val_fraction=val_fraction,
            seed=seed,
        )
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    counts = np.bincount(y)
    if counts[counts > 0].min() < folds:
        msg = (
            f"cv.folds={folds} but the smallest class has only {counts[counts > 0].min()} "
            "bags; lower cv.folds."
        )
        raise ConfigError(msg)  # a setting that does not fit the data: exit code 2
    out = []
    for r in range(repeats):
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        rng = np.random.default_rng(seed * 1000 + r)
        for k, (train_idx, test_idx) in enumerate(skf.split(np.zeros(len(y)), y)):
            train, val = _holdout(train_idx, y, val_fraction, rng)
            out.append(
                Fold(
                    r,
                    k,
                    tuple(train.tolist()),
                    tuple(val.tolist()),
                    tuple(test_idx.tolist()),
                )
            )
    return out


def _group_keys(groups: Sequence[str | None]) -> np.ndarray:
    """Patient of each bag; a bag without one is its own group."""
    return np.asarray(
        [f"patient:{g}" if g else f"bag:{i}" for i, g in enumerate(groups)]
    )


def grouped_kfold_splits(
    labels: Sequence[int],
    groups: Sequence[str | None],
    *,
    folds: int,
    repeats: int,
    val_fraction: float,
    seed: int,
) -> list[Fold]:
    """Repeated stratified *group* k-fold: a patient sits in one part of each fold.

    Test folds come from scikit-learn's ``StratifiedGroupKFold``; the validation
    hold-out is drawn among the training part's patients, stratified by the
    patient's label. Every fold is checked with :func:`check_grouping`.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    keys = _group_keys(groups)
    uniq, first = np.unique(keys, return_index=True)
    counts = np.bincount(y[first])
    if counts[counts > 0].min() < folds:
        msg = (
            f"cv.folds={folds} but the smallest class has only "
            f"{counts[counts > 0].min()} patients; lower cv.folds."
        )
        raise DataError(msg)
    out = []
    for r in range(repeats):
        sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        rng = np.random.default_rng(seed * 1000 + r)
        for k, (train_idx, test_idx) in enumerate(
            sgkf.split(np.zeros(len(y)), y, keys)
        ):
            # hold out whole patients: stratified over the patients' first bags
            heads = np.asarray(
                [i for i in train_idx if first[np.searchsorted(uniq, keys[i])] == i]
            )
            _, val_heads = _holdout(heads, y, val_fraction, rng)
            val_keys = set(keys[val_heads].tolist())
            in_val = np.asarray([keys[i] in val_keys for i in train_idx], dtype=bool)
            out.append(
                Fold(
                    r,
                    k,
                    tuple(train_idx[~in_val].tolist()),
                    tuple(train_idx[in_val].tolist()),
                    tuple(test_idx.tolist()),
                )
            )
    check_grouping(out, groups, where="generated folds")
    return out


def check_grouping(
    folds: Sequence[Fold], groups: Sequence[str | None], *, where: str
) -> None:
    """DataError naming the patient and fold when a patient sits in two parts."""
    for f in folds:
        parts = {
            name: {groups[i] for i in idx if groups[i]}
            for name, idx in (("train", f.train), ("val", f.val), ("test", f.test))
        }
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = sorted(parts[a] & parts[b])
            if shared:
                msg = (
                    f"{where}: fold {f.name} puts patient {shared[0]!r} in both "
                    f"{a} and {b} ({len(shared)} patient(s) shared)."
                )
                raise DataError(msg)


def fixed_split(splits: Sequence[str | None]) -> list[Fold]:
    """One fold from per-bag ``train``/``val``/``test`` tags."""
    idx = {
        s: tuple(i for i, t in enumerate(splits) if t == s)
        for s in ("train", "val", "test")
    }
    if not idx["train"] or not idx["test"]:
        msg = "The data's split column needs at least one 'train' and one 'test' bag."
        raise DataError(msg)
    if not idx["val"]:
        logger.warning(
            "The data's split column has no 'val' rows: the last epoch is kept, the "
            "threshold is 0.5 and nothing is chosen on validation data (add 'val' rows, "
            "or set cv.use_source_split: false for cross-validation)."
        )
    return [Fold(0, 0, idx["train"], idx["val"], idx["test"])]


def read_split_file(path: str | Path, slide_ids: Sequence[str]) -> list[Fold]:
    """Folds from a CSV ``slide_id,repeat,fold,split`` (split in train/val/test)."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: split file not found."
        raise DataError(msg)
    pos = {s: i for i, s in enumerate(slide_ids)}
    table: dict[tuple[int, int], dict[str, list[int]]] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"slide_id", "repeat", "fold", "split"} - set(reader.fieldnames or [])
        if missing:
            msg = f"{path}: missing columns {sorted(missing)}."
            raise DataError(msg)
        for lineno, row in enumerate(reader, start=2):
            sid = row["slide_id"].strip()
            if sid not in pos:
                msg = f"{path}, row {lineno}: unknown slide_id {sid!r}."
                raise DataError(msg)
            split = row["split"].strip()
            if split not in ("train", "val", "test"):
                msg = f"{path}, row {lineno}: split {split!r} is not train/val/test."
                raise DataError(msg)
            try:
                key = (int(row["repeat"]), int(row["fold"]))
            except ValueError:
                msg = f"{path}, row {lineno}: repeat and fold must be integers."
                raise DataError(msg) from None
            table.setdefault(key, {"train": [], "val": [], "test": []})[split].append(
                pos[sid]
            )
    if not table:
        msg = f"{path}: no rows."
        raise DataError(msg)
    folds = [
        Fold(r, k, tuple(v["train"]), tuple(v["val"]), tuple(v["test"]))
        for (r, k), v in sorted(table.items())
    ]
    for f in folds:
        if set(f.train) & set(f.test):
            msg = f"{path}: fold {f.name} has bags in both train and test."
            raise DataError(msg)
        if set(f.val) & set(f.test):
            logger.warning(
                "%s: fold %s puts %d bags in both val and test: model selection and "
                "thresholds will see the test fold (an optimistic protocol).",
                path,
                f.name,
                len(set(f.val) & set(f.test)),
            )
    return folds


def write_split_file(
    path: str | Path, folds: Sequence[Fold], slide_ids: Sequence[str]
) -> None:
    """Write folds in the format :func:`read_split_file` reads, atomically."""
    from tiahnm.utils.io import atomic_open

    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "repeat", "fold", "split"])
        for f in folds:
            for split, idx in (("train", f.train), ("val", f.val), ("test", f.test)):
                for i in idx:
                    w.writerow([slide_ids[i], f.repeat, f.fold, split])
