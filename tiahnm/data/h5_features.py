"""Per-slide HDF5 feature files in the CLAM / TRIDENT layout, plus a labels CSV."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tiahnm.data.bag import Bag
from tiahnm.data.cohort import apply_cohort, read_cohort_columns
from tiahnm.data.uniform import FeatureOrigin, check_uniform, h5_encoder_name
from tiahnm.errors import DataError
from tiahnm.slides.store import read_feature_arrays

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Integer labels are class indices; a larger one is taken as a mistake, not a class.
MAX_INTEGER_CLASSES = 10_000


def read_labels_csv(
    path: str | Path,
    *,
    classes: list[str] | None = None,
    label_fallback: str | Sequence[str] | None = None,
    require_all: bool = True,
) -> tuple[dict[str, int], dict[str, str], list[str]]:
    """Read ``slide_id,label[,split]``.

    Labels may be integers or class names; class names are mapped to indices in the
    order of ``classes`` (or sorted order when not given).

    Args:
        path (str | Path): The CSV (with a header row).
        classes (list[str] | None): Allowed class names, in index order.
        label_fallback (str | Sequence[str] | None): Column(s) used as the label when
            the CSV has no ``label`` column (the survival event column, then the
            regression target column).
        require_all (bool): Every listed class (``classes``) must have a row
            (False for an external cohort scored with a trained model).

    Returns:
        tuple: ``(labels, splits, classes)``: slide id to class index, slide id to split
        (only for rows that give one), and the class names.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: labels CSV not found."
        raise DataError(msg)
    try:
        raw, splits = _read_label_rows(path, label_fallback)
    except UnicodeDecodeError as exc:
        msg = f"{path}: not a UTF-8 text CSV ({exc})."
        raise DataError(msg) from None
    except csv.Error as exc:
        msg = f"{path}: malformed CSV ({exc})."
        raise DataError(msg) from None
    if not raw:
        msg = f"{path}: no rows."
        raise DataError(msg)
    values = sorted(set(raw.values()))
    given = classes is not None
    if classes is None:
        ints = _integers(values)
        if ints is not None:
            if ints[-1] >= MAX_INTEGER_CLASSES:
                msg = (
                    f"{path}: integer label {ints[-1]} would mean {ints[-1] + 1} "
                    f"classes (integer labels are class indices 0..K-1, K <= "
                    f"{MAX_INTEGER_CLASSES}); give data.options.classes for other names."
                )
                raise DataError(msg)
            classes = [str(i) for i in range(max(ints[-1], 0) + 1)]
        else:
            classes = values
    index = {c: i for i, c in enumerate(classes)}
    labels = {}
    for sid, value in raw.items():
        if value not in index:
            msg = (
                f"{path}: label {value!r} of slide {sid!r} is not one of the classes "
                f"{classes}."
            )
            raise DataError(msg)
        labels[sid] = index[value]
    if require_all and given:
        absent = [c for c in classes if c not in set(raw.values())]
        if absent:
            msg = (
                f"{path}: class {absent[0]!r} listed in data.options.classes has no "
                f"rows (classes without rows: {absent}); remove it from the list."
            )
            raise DataError(msg)
    return labels, splits, classes


def _integers(values: list[str]) -> list[int] | None:
    """The sorted integers when every label is an ASCII integer, else None."""
    ints = []
    for v in values:
        if not v.isascii() or not v.lstrip("-").isdigit():
            return None
        ints.append(int(v))
    return sorted(ints)


def _read_label_rows(
    path: Path, label_fallback: str | Sequence[str] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """``(slide id -> raw label, slide id -> split)`` of a labels CSV, checked per row."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        label_col = "label"
        fallbacks = [label_fallback] if isinstance(label_fallback, str) else []
        fallbacks = fallbacks or list(label_fallback or [])
        if "label" not in fields:
            label_col = next((c for c in fallbacks if c in fields), "label")
        for needed in ("slide_id", label_col):
            if needed not in fields:
                msg = (
                    f"{path}: missing column {needed!r} (columns: {', '.join(fields)})."
                )
                raise DataError(msg)
        raw: dict[str, str] = {}
        splits: dict[str, str] = {}
        for lineno, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            sid = row["slide_id"]
            if not sid:
                msg = f"{path}, row {lineno}: empty slide_id."
                raise DataError(msg)
            if sid in raw:
                msg = f"{path}, row {lineno}: duplicate slide_id {sid!r}."
                raise DataError(msg)
            if not row[label_col]:
                msg = f"{path}, row {lineno}: missing {label_col} for {sid!r}."
                raise DataError(msg)
            raw[sid] = row[label_col]
            split = row.get("split", "")
            if split:
                if split not in SPLITS:
                    msg = (
                        f"{path}, row {lineno}: split {split!r} is not one of {SPLITS}."
                    )
                    raise DataError(msg)
                splits[sid] = split
    return raw, splits


def read_feature_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``features`` ``[N, D]`` and ``coords`` ``[N, 2]`` from one HDF5 file.

    Both the CLAM/TRIDENT layout (``features`` maybe ``[1, N, D]``) and files with an
    extra leading axis are accepted. Errors name the file and the problem
    (:func:`tiahnm.slides.store.read_feature_arrays`).
    """
    arrays = read_feature_arrays(path)
    return arrays.features, arrays.coords


class H5FeatureFolder:
    """A folder of ``<slide_id>.h5`` feature files and a ``slide_id,label[,split]`` CSV.

    Args:
        features_dir (str): Folder with one HDF5 file per slide.
        labels_csv (str): Labels CSV with header ``slide_id,label`` and optional
            ``split`` (``train``/``val``/``test``).
        classes (list[str] | None): Class names in index order (default: sorted labels).
        missing (str): ``"error"`` (default) or ``"skip"`` for slides in the CSV
            without a feature file.
        stream (bool): Memory-map each file's ``features`` instead of keeping them in
            RAM (for cohorts larger than memory): the files are still read once and
            checked at load, then the OS pages features in while training, and the
            loop reads bags ahead in background threads (``train.prefetch``). Files
            whose ``features`` are chunked, compressed or not float32 are read into
            memory (with a warning).
        max_bytes (int | None): Largest declared size of one dataset in a feature
            file, checked before reading (default 4 GiB or
            ``$TIAHNM_MAX_DATASET_BYTES``).

    Slide ids are file names: an id with a path separator, ``..``, or an absolute
    path is refused, so nothing outside ``features_dir`` is read.
        patient_column (str): Patient column of the CSV (``case_id`` is also
            accepted for the default); cross-validation groups by it.
        time_column (str): Survival time column (read when present).
        event_column (str): Survival event column (0/1); also the label when the
            CSV has no ``label`` column.
        target_column (str): Regression target column (read when present; the
            label when the CSV has neither ``label`` nor the event column).
    """

    def __init__(
        self,
        features_dir: str,
        labels_csv: str,
        *,
        classes: list[str] | None = None,
        missing: str = "error",
        stream: bool = False,
        max_bytes: int | None = None,
        patient_column: str = "patient_id",
        time_column: str = "time",
        event_column: str = "event",
        target_column: str = "target",
    ) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.cohort_columns = {
            "patient_column": patient_column,
            "time_column": time_column,
            "event_column": event_column,
            "target_column": target_column,
        }
        self.features_dir = Path(features_dir)
        self.labels_csv = Path(labels_csv)
        self.classes = classes
        #: Every class of ``classes`` must have a row (off for external cohorts).
        self.require_all_classes = True
        if missing not in ("error", "skip"):
            msg = f"data.options.missing must be 'error' or 'skip', got {missing!r}."
            raise DataError(msg)
        self.missing = missing

    def load(self) -> list[Bag]:
        """Read every labelled slide's features."""
        labels, splits, names = read_labels_csv(
            self.labels_csv,
            classes=self.classes,
            label_fallback=(
                self.cohort_columns["event_column"],
                self.cohort_columns["target_column"],
            ),
            require_all=self.require_all_classes,
        )
        cohort = read_cohort_columns(self.labels_csv, **self.cohort_columns)
        if not self.features_dir.is_dir():
            msg = f"{self.features_dir}: features folder not found."
            raise DataError(msg)
        bags = []
        origins = []
        skipped: list[str] = []
        for sid, label in labels.items():
            path = feature_path(self.features_dir, sid, self.labels_csv)
            if not path.is_file():
                if self.missing == "skip":
                    skipped.append(sid)
                    continue
                msg = (
                    f"{self.labels_csv}: slide {sid!r} has no feature file {path} "
                    "(set data.options.missing: skip to ignore)."
                )
                raise DataError(msg)
            arrays = read_feature_arrays(path, max_bytes=self.max_bytes)
            feats, coords = arrays.features, arrays.coords
            origins.append(
                FeatureOrigin(str(path), h5_encoder_name(path), int(feats.shape[1]))
            )
            tensor, meta = torch.from_numpy(feats), {}
            if self.stream:
                mapped = map_features(path)
                if mapped is None:
                    logger.warning(
                        "%s: 'features' cannot be memory-mapped (chunked, compressed "
                        "or not float32); read into memory.",
                        path,
                    )
                else:
                    tensor, meta = mapped, {"storage": "mmap"}
            meta["class_name"] = names[label]
            bag = Bag(
                slide_id=sid,
                label=label,
                features=tensor,
                meta=meta,
                coords=coords,
                instance_labels=arrays.instance_labels,
                split=splits.get(sid),
                source=str(path),
            )
            bags.append(apply_cohort(bag, cohort, sid, self.labels_csv))
        if skipped:
            logger.warning(
                "%s: %d slide(s) of %s have no feature file and are skipped "
                "(data.options.missing: skip): %s",
                self.features_dir,
                len(skipped),
                self.labels_csv,
                ", ".join(skipped),
            )
        if not bags:
            msg = f"{self.features_dir}: no feature files for the slides in {self.labels_csv}."
            raise DataError(msg)
        check_uniform(origins)
        return bags


def feature_path(features_dir: Path, slide_id: str, labels_csv: Path) -> Path:
    """``features_dir/<slide_id>.h5``, checked to stay inside ``features_dir``.

    Raises:
        DataError: The id is absolute, holds a path separator or ``..``, or a NUL.
    """
    bad = (
        not slide_id
        or "\0" in slide_id
        or "/" in slide_id
        or "\\" in slide_id
        or slide_id in (".", "..")
        or Path(slide_id).is_absolute()
    )
    path = features_dir / f"{slide_id}.h5"
    inside = os.path.normpath(path.absolute()).startswith(
        os.path.normpath(features_dir.absolute()) + os.sep
    )
    if bad or not inside:
        msg = (
            f"{labels_csv}: slide_id {slide_id!r} is not a plain file name (ids with "
            "path separators, '..' or absolute paths would read outside "
            f"{features_dir}); refused."
        )
        raise DataError(msg)
    return path


def map_features(path: str | Path) -> torch.Tensor | None:
    """``features`` ``[N, D]`` of an HDF5 file as a memory-mapped (copy-on-write) tensor.

    Only a contiguous, uncompressed little-endian float32 dataset can be mapped (the
    layout ``tiahnm extract``, CLAM and TRIDENT write); None for any other layout.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            ds = f["features"]
            offset = ds.id.get_offset()
            if (
                ds.chunks is not None
                or ds.compression is not None
                or ds.dtype != np.dtype("<f4")
                or offset is None
                or ds.ndim not in (2, 3)
            ):
                return None
            shape = tuple(ds.shape)
    except (OSError, KeyError) as exc:
        msg = f"{path}: unreadable HDF5 feature file ({exc})."
        raise DataError(msg) from None
    if len(shape) == 3:
        if shape[0] != 1:
            return None
        shape = shape[1:]
    mm = np.memmap(path, dtype=np.float32, mode="c", offset=offset, shape=shape)
    return torch.from_numpy(mm)
