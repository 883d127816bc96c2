"""Patch-level labels from slide annotations, by overlap fraction (evaluation only).

Supported annotation files (coordinates in level-0 pixels of the slide):

* GeoJSON (``.geojson``/``.json``): a FeatureCollection, a list of Features (QuPath
  export), a Feature or a bare geometry; Polygon and MultiPolygon geometries are used.
  ``classes`` selects features by class name (QuPath ``classification.name``, or
  ``classification``/``class``/``label``/``name`` properties).
* ASAP / Camelyon XML (``.xml``): ``<Annotation PartOfGroup=... Type="Polygon">`` with
  ``<Coordinate X= Y=>``; groups named in ``exclude_groups`` (Camelyon16's ``_2``:
  normal tissue inside tumour) are subtracted.
* Binary mask images (``.png``/``.jpg``/``.tif``/``.tiff``/``.npy``): non-zero is
  positive; the mask covers the whole slide at any downsample (its scale is its size
  over the slide's level-0 size).

A patch's overlap is the fraction of its level-0 footprint inside the annotated
region; its label is ``overlap >= min_overlap``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.errors import DataError

ANNOTATION_SUFFIXES = (
    ".geojson",
    ".json",
    ".xml",
    ".png",
    ".jpg",
    ".tif",
    ".tiff",
    ".npy",
)
MASK_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy"})
DEFAULT_EXCLUDE_GROUPS = ("_2", "Exclusion", "exclusion")


@dataclass
class PatchLabels:
    """Patch labels of one slide.

    Attributes:
        labels (np.ndarray): ``[N]`` int8, 1 when ``overlap >= min_overlap``.
        overlap (np.ndarray): ``[N]`` float32 overlap fractions.
        attrs (dict): Provenance (annotation file, its sha256, threshold).
    """

    labels: np.ndarray
    overlap: np.ndarray
    attrs: dict[str, Any]


def find_annotation(root: str | Path, slide_id: str) -> Path | None:
    """The annotation file of ``slide_id``: ``root/<slide_id>.<ext>``, or ``root``.

    A file given as ``root`` applies only to the slide of the same name.
    """
    root = Path(root)
    if root.is_file():
        return root if root.stem == slide_id else None
    for suffix in ANNOTATION_SUFFIXES:
        candidate = root / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _class_name(props: Any) -> str | None:
    if not isinstance(props, dict):
        return None
    cls = props.get("classification")
    if isinstance(cls, dict):
        return cls.get("name")
    if isinstance(cls, str):
        return cls
    for key in ("class", "label", "name"):
        if isinstance(props.get(key), str):
            return props[key]
    return None


def read_geojson(path: str | Path, *, classes: Sequence[str] | None = None) -> Any:
    """Union of the (selected) polygons of a GeoJSON file, as a shapely geometry.

    Raises:
        DataError: Unreadable file or invalid geometry (names the file).
    """
    from shapely.geometry import shape
    from shapely.ops import unary_union
    from shapely.validation import make_valid

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        msg = f"{path}: unreadable GeoJSON ({exc})."
        raise DataError(msg) from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        msg = f"{path}: not a GeoJSON FeatureCollection, Feature list or geometry."
        raise DataError(msg)
    wanted = set(classes) if classes else None
    geoms = []
    for i, feat in enumerate(features):
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        if not geom or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        if wanted is not None and _class_name(feat.get("properties")) not in wanted:
            continue
        try:
            geoms.append(make_valid(shape(geom)))
        except Exception as exc:
            msg = f"{path}: feature {i}: invalid geometry ({exc})."
            raise DataError(msg) from None
    return unary_union(geoms) if geoms else None


def read_asap_xml(
    path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    exclude_groups: Iterable[str] = DEFAULT_EXCLUDE_GROUPS,
) -> Any:
    """Union of ASAP/Camelyon polygons minus the excluded groups (shapely geometry).

    Raises:
        DataError: Unreadable XML (names the file).
    """
    from shapely.geometry import Polygon
    from shapely.ops import unary_union
    from shapely.validation import make_valid

    try:
        from defusedxml import ElementTree
    except ImportError:  # pragma: no cover - defusedxml comes with tiatoolbox
        from xml.etree import ElementTree

    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except Exception as exc:
        msg = f"{path}: unreadable ASAP XML ({exc})."
        raise DataError(msg) from None
    excluded = set(exclude_groups)
    wanted = set(classes) if classes else None
    keep, drop = [], []
    for ann in root.iter("Annotation"):
        group = ann.get("PartOfGroup") or ""
        points: list[tuple[float, float, float]] = []
        for c in ann.iter("Coordinate"):
            try:
                order = float(c.get("Order", len(points)))
                points.append((order, float(c.get("X", "")), float(c.get("Y", ""))))
            except (TypeError, ValueError):
                msg = f"{path}: annotation {ann.get('Name')!r}: bad coordinate."
                raise DataError(msg) from None
        if len(points) < 3:
            continue
        points.sort()
        poly = make_valid(Polygon([(x, y) for _, x, y in points]))
        if group in excluded:
            drop.append(poly)
        elif wanted is None or group in wanted:
            keep.append(poly)
    if not keep:
        return None
    region = unary_union(keep)
    if drop:
        region = region.difference(unary_union(drop))
    return region


def read_mask_image(path: str | Path) -> np.ndarray:
    """A binary mask (``[h, w]`` bool) from an image or ``.npy`` file."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as exc:
        msg = f"{path}: unreadable mask image ({exc})."
        raise DataError(msg) from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] <= 4 else arr[0]
    if arr.ndim != 2:
        msg = f"{path}: mask must be 2-D, got shape {arr.shape}."
        raise DataError(msg)
    return arr > 0


def polygon_overlap(region: Any, boxes_level0: np.ndarray) -> np.ndarray:
    """Fraction of each ``(x0, y0, x1, y1)`` box inside a shapely ``region``."""
    import shapely

    boxes = shapely.box(
        boxes_level0[:, 0], boxes_level0[:, 1], boxes_level0[:, 2], boxes_level0[:, 3]
    )
    out = np.zeros(len(boxes), dtype=np.float32)
    if region is None or region.is_empty or len(boxes) == 0:
        return out
    tree = shapely.STRtree(boxes)
    parts = list(getattr(region, "geoms", [region]))
    hits = np.unique(
        np.concatenate([tree.query(p, predicate="intersects") for p in parts])
    ).astype(np.int64)
    if hits.size:
        prepared = region
        shapely.prepare(prepared)
        inter = shapely.area(shapely.intersection(boxes[hits], prepared))
        out[hits] = inter / np.maximum(shapely.area(boxes[hits]), 1e-12)
    return np.clip(out, 0.0, 1.0)


def label_patches(
    annotation: str | Path,
    coords: np.ndarray,
    patch_size_level0: float | tuple[float, float],
    *,
    dimensions: tuple[int, int] | None = None,
    min_overlap: float = 0.5,
    classes: Sequence[str] | None = None,
) -> PatchLabels:
    """Label patches by their overlap with an annotation file.

    Args:
        annotation (str | Path): GeoJSON, ASAP XML or binary mask file.
        coords (np.ndarray): ``[N, 2]`` level-0 top-left corners.
        patch_size_level0 (float | tuple[float, float]): Patch footprint in level-0
            pixels (``patch_size / scale``).
        dimensions (tuple[int, int] | None): Level-0 (width, height); required for
            mask images.
        min_overlap (float): Positive when at least this fraction is annotated.
        classes (Sequence[str] | None): Only these classes/groups count (polygons).

    Returns:
        PatchLabels: Labels, overlaps and provenance.

    Raises:
        DataError: Unreadable annotations, or a mask without slide dimensions.
    """
    from tiahnm.encoders.base import sha256_file
    from tiahnm.slides.tiling import patch_fractions

    path = Path(annotation)
    if not path.is_file():
        msg = f"{path}: annotation file not found."
        raise DataError(msg)
    if not 0.0 <= min_overlap <= 1.0:
        msg = f"min_overlap must be within [0, 1], got {min_overlap}."
        raise DataError(msg)
    pw, ph = (
        patch_size_level0
        if isinstance(patch_size_level0, (tuple, list))
        else (patch_size_level0, patch_size_level0)
    )
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    boxes = np.column_stack([xy[:, 0], xy[:, 1], xy[:, 0] + pw, xy[:, 1] + ph])
    suffix = path.suffix.lower()
    if suffix in MASK_SUFFIXES:
        if dimensions is None:
            msg = f"{path}: a mask annotation needs the slide's level-0 dimensions."
            raise DataError(msg)
        overlap = patch_fractions(read_mask_image(path), boxes, dimensions)
        kind = "mask"
    elif suffix == ".xml":
        overlap = polygon_overlap(read_asap_xml(path, classes=classes), boxes)
        kind = "asap_xml"
    elif suffix in (".geojson", ".json"):
        overlap = polygon_overlap(read_geojson(path, classes=classes), boxes)
        kind = "geojson"
    else:
        msg = f"{path}: unsupported annotation format {suffix!r} (GeoJSON, XML, mask)."
        raise DataError(msg)
    labels = (overlap >= min_overlap) & (overlap > 0)
    attrs = {
        "annotation": str(path),
        "annotation_format": kind,
        "annotation_sha256": sha256_file(path),
        "min_overlap": float(min_overlap),
        "classes": list(classes) if classes else [],
    }
    return PatchLabels(
        labels=labels.astype(np.int8), overlap=overlap.astype(np.float32), attrs=attrs
    )
