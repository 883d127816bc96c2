"""Per-slide HDF5 feature files (CLAM / TRIDENT layout) written atomically.

Layout of ``<slide_id>.h5``:

* ``features``: ``[N, D]`` float32.
* ``coords``: ``[N, 2]`` int64, top-left patch corners in **level-0 pixels** (x, y).
  Its attributes: ``patch_size`` (at the target resolution), ``patch_size_level0``,
  ``resolution``, ``units``, ``coord_space = "level0"``.
* ``tissue_fraction``: ``[N]`` float32 (1 when no masker was used).
* optional ``instance_labels`` ``[N]`` int8 and ``instance_overlap`` ``[N]`` float32
  (patch-level ground truth from annotations, for evaluation only).
* file attributes: the extraction settings (``encoder``, ``encoder_weights_sha256``,
  ``resolution``, ``units``, ``patch_size``, ``stride``, ``tiatoolbox_version``,
  ``tiahnm_version`` ...) and ``settings``, their JSON used to skip finished slides.

Reading (:func:`read_feature_arrays`, also for files of CLAM, TRIDENT or other tools)
opens nothing but the file itself: links, external storage and virtual datasets are
refused, and so is a dataset declaring more than :func:`max_dataset_bytes`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.errors import DataError
from tiahnm.utils.io import atomic_path

#: Default limit of one dataset's declared size (raise with ``data.options.max_bytes``
#: or the environment variable below): a file cannot make tiahnm allocate more.
MAX_DATASET_BYTES = 4 * 2**30
MAX_BYTES_ENV = "TIAHNM_MAX_DATASET_BYTES"


def _attr_value(value: Any) -> Any:
    """h5py-storable form of an attribute.

    Numeric lists become arrays, dicts and other lists JSON strings, None ``""``.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # e.g. torch's TorchVersion, which h5py cannot store
    if (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            for v in value
        )
    ):
        return np.asarray(value)  # numeric vectors as arrays
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, Path):
        return str(value)
    return value


def write_feature_file(
    path: str | Path,
    *,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: Mapping[str, Any],
    coords_attrs: Mapping[str, Any] | None = None,
    tissue_fraction: np.ndarray | None = None,
    instance_labels: np.ndarray | None = None,
    instance_overlap: np.ndarray | None = None,
    labels_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide's features atomically (a crash leaves no partial file).

    Args:
        path (str | Path): Destination ``<slide_id>.h5``.
        features (np.ndarray): ``[N, D]``.
        coords (np.ndarray): ``[N, 2]`` level-0 (x, y).
        attrs (Mapping): File attributes.
        coords_attrs (Mapping | None): Attributes of ``coords``.
        tissue_fraction (np.ndarray | None): ``[N]``.
        instance_labels (np.ndarray | None): ``[N]`` 0/1 patch labels.
        instance_overlap (np.ndarray | None): ``[N]`` annotation overlap fractions.
        labels_attrs (Mapping | None): Attributes of ``instance_labels``.

    Returns:
        Path: ``path``.
    """
    import h5py

    path = Path(path)
    features = np.ascontiguousarray(features, dtype=np.float32)
    coords = np.ascontiguousarray(coords, dtype=np.int64)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            ds = f.create_dataset("coords", data=coords)
            for key, value in (coords_attrs or {}).items():
                ds.attrs[key] = _attr_value(value)
            if tissue_fraction is not None:
                f.create_dataset(
                    "tissue_fraction", data=np.asarray(tissue_fraction, np.float32)
                )
            if instance_labels is not None:
                _write_labels(f, instance_labels, instance_overlap, labels_attrs)
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(value)
    return path


def _write_labels(
    f: Any,
    labels: np.ndarray,
    overlap: np.ndarray | None,
    attrs: Mapping[str, Any] | None,
) -> None:
    for name in ("instance_labels", "instance_overlap"):
        if name in f:
            del f[name]
    ds = f.create_dataset("instance_labels", data=np.asarray(labels, dtype=np.int8))
    for key, value in (attrs or {}).items():
        ds.attrs[key] = _attr_value(value)
    if overlap is not None:
        f.create_dataset("instance_overlap", data=np.asarray(overlap, np.float32))


def add_instance_labels(
    path: str | Path,
    labels: np.ndarray,
    overlap: np.ndarray | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Add (or replace) ``instance_labels`` in an existing feature file, atomically."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            n = f["features"].shape[0]
            if len(labels) != n:
                msg = f"{path}: {len(labels)} labels for {n} patches."
                raise ValueError(msg)
            _write_labels(f, labels, overlap, attrs)


def read_attrs(path: str | Path) -> dict[str, Any] | None:
    """File attributes of a feature file, or None when it is absent or unreadable."""
    import h5py

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                return None
            out = {k: _plain(v) for k, v in f.attrs.items()}
            out["n_patches"] = int(f["features"].shape[0])
            if "instance_labels" in f:
                out["instance_labels_attrs"] = {
                    k: _plain(v) for k, v in f["instance_labels"].attrs.items()
                }
            return out
    except (OSError, ValueError, KeyError):
        return None


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@dataclass
class FeatureArrays:
    """The arrays of one feature file.

    Attributes:
        features (np.ndarray): ``[N, D]`` float32.
        coords (np.ndarray | None): ``[N, 2]`` patch coordinates (level-0 pixels in
            files written by ``tiahnm extract``).
        instance_labels (np.ndarray | None): ``[N]`` int64 patch labels (evaluation
            ground truth from annotations), when the file has them.
    """

    features: np.ndarray
    coords: np.ndarray | None = None
    instance_labels: np.ndarray | None = None


def read_feature_arrays(
    path: str | Path, *, max_bytes: int | None = None
) -> FeatureArrays:
    """Read ``features``, ``coords`` and (if present) ``instance_labels``.

    Both the CLAM/TRIDENT layout (``features`` maybe ``[1, N, D]``) and files with an
    extra leading axis are accepted; ``instance_labels`` must hold one value per
    instance. Errors name the file and the problem. Links, external storage and datasets declaring more than ``max_bytes``
    (default :func:`max_dataset_bytes`) are refused before anything is read.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if not _has(f, "features"):
                msg = f"{path}: no 'features' dataset (keys: {', '.join(f.keys())})."
                raise DataError(msg)
            feats = _numeric(path, f, "features", max_bytes).astype(np.float32)
            coords = (
                _numeric(path, f, "coords", max_bytes) if _has(f, "coords") else None
            )
            labels = (
                _numeric(path, f, "instance_labels", max_bytes)
                if _has(f, "instance_labels")
                else None
            )
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        msg = f"{path}: unreadable HDF5 feature file ({exc})."
        raise DataError(msg) from None
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2:
        msg = f"{path}: 'features' must be [N, D], got shape {feats.shape}."
        raise DataError(msg)
    if feats.shape[0] == 0:
        msg = f"{path}: empty bag (0 instances)."
        raise DataError(msg)
    if feats.shape[1] == 0:
        msg = f"{path}: 'features' has width 0 (shape {feats.shape})."
        raise DataError(msg)
    if not np.isfinite(feats).all():
        msg = f"{path}: 'features' contains NaN or infinite values."
        raise DataError(msg)
    if coords is not None:
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if coords.ndim != 2 or coords.shape[0] != feats.shape[0]:
            msg = f"{path}: 'coords' shape {coords.shape} does not match {feats.shape[0]} instances."
            raise DataError(msg)
        if not np.isfinite(coords).all():
            msg = f"{path}: 'coords' contains NaN or infinite values."
            raise DataError(msg)
    if labels is not None:
        labels = labels.reshape(-1) if labels.size == feats.shape[0] else labels
        if labels.shape != (feats.shape[0],):
            msg = f"{path}: 'instance_labels' shape {labels.shape} does not match {feats.shape[0]} instances."
            raise DataError(msg)
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            msg = f"{path}: 'instance_labels' must hold integers (got NaN/inf or fractions)."
            raise DataError(msg)
        labels = labels.astype(np.int64)
    return FeatureArrays(feats, coords, labels)


def _numeric(path: Path, f: Any, name: str, max_bytes: int | None = None) -> np.ndarray:
    """Dataset ``name`` of an open HDF5 file as a plain numeric array.

    Raises:
        DataError: ``name`` is a group, an empty (null-dataspace) dataset, or not of a
            numeric type (strings, compound records ...).
    """
    import h5py

    node = safe_dataset(path, f, name)
    if not isinstance(node, h5py.Dataset):
        msg = f"{path}: {name!r} is a {type(node).__name__}, not a dataset."
        raise DataError(msg)
    if node.shape is None:
        msg = f"{path}: {name!r} is an empty (null) dataset."
        raise DataError(msg)
    if node.dtype.kind not in "biuf":
        msg = f"{path}: {name!r} has non-numeric type {node.dtype}."
        raise DataError(msg)
    check_size(path, name, node, max_bytes)
    try:
        return np.asarray(node[()])
    except MemoryError:
        msg = (
            f"{path}: {name!r} ({_declared_bytes(node) / 2**30:.1f} GiB) does not fit "
            "in memory."
        )
        raise DataError(msg) from None


def _has(f: Any, name: str) -> bool:
    """Whether ``f`` has a link ``name`` (without following it: no other file opened)."""
    return f.get(name, getlink=True) is not None


def max_dataset_bytes(max_bytes: int | None = None) -> int:
    """The per-dataset size limit: ``max_bytes``, ``$TIAHNM_MAX_DATASET_BYTES`` or 4 GiB."""
    if max_bytes is not None:
        return int(max_bytes)
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    return int(raw) if raw.isdigit() else MAX_DATASET_BYTES


def safe_dataset(path: Path, f: Any, name: str) -> Any:
    """Node ``name`` of an open HDF5 file, refusing anything that reads other files.

    External links, soft links, external raw storage and virtual datasets are refused:
    a feature file is read on its own, so nothing outside the data folder is opened.
    """
    import h5py

    link = f.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        msg = (
            f"{path}: {name!r} is a {type(link).__name__} (links to other files or "
            "paths are refused; store the dataset in the file itself)."
        )
        raise DataError(msg)
    node = f[name]
    if isinstance(node, h5py.Dataset):
        if node.external:
            msg = (
                f"{path}: {name!r} keeps its data in external files "
                f"({', '.join(str(e[0]) for e in node.external)}); refused."
            )
            raise DataError(msg)
        if node.is_virtual:
            msg = f"{path}: {name!r} is a virtual dataset (maps other files); refused."
            raise DataError(msg)
    return node


def _declared_bytes(node: Any) -> int:
    return int(np.prod(node.shape, dtype=np.float64) * node.dtype.itemsize)


def check_size(path: Path, name: str, node: Any, max_bytes: int | None = None) -> None:
    """Refuse a dataset whose declared size exceeds the limit, before reading it."""
    limit = max_dataset_bytes(max_bytes)
    size = _declared_bytes(node)
    if size > limit:
        msg = (
            f"{path}: {name!r} declares shape {tuple(node.shape)} ({size / 2**30:.2f} "
            f"GiB), over the limit of {limit / 2**30:.2f} GiB per dataset; raise it "
            f"with data.options.max_bytes or ${MAX_BYTES_ENV} if the file is real."
        )
        raise DataError(msg)
    if node.chunks is None and node.compression is None:
        file_size = path.stat().st_size
        if size > file_size:
            msg = (
                f"{path}: {name!r} declares {size} bytes but the file has only "
                f"{file_size} (truncated or corrupt)."
            )
            raise DataError(msg)
