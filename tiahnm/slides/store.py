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
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.utils.io import atomic_path


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
