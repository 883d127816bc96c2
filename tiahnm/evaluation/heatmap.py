"""Heatmaps of stored instance scores over slide thumbnails (no encoder re-run).

For each slide of an ``instance_scores.h5`` (:mod:`tiahnm.evaluation.scores`):

* ``<slide_id>.png``: the thumbnail (TIAToolbox ``WSIReader`` at a low resolution)
  with the patch scores on top, patches below the threshold left transparent, a colour
  bar, and the slide label and prediction in the title;
* ``<slide_id>_overlay.png``: the same overlay alone, RGBA at the thumbnail size
  (alpha 0 below the threshold), to lay over the thumbnail elsewhere;
* optionally ``<slide_id>.geojson`` (one polygon per patch in level-0 pixels, with a
  ``score`` property) and ``<slide_id>.db``, a TIAToolbox ``SQLiteStore`` of the same
  polygons that TIAToolbox's viewer (``tiatoolbox visualize``) overlays on the slide.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.errors import DataError
from tiahnm.evaluation.scores import SlideScores
from tiahnm.utils.io import atomic_open, atomic_path

logger = logging.getLogger(__name__)

#: Score kinds that are probabilities (drawn on a fixed 0-1 colour scale by default).
PROBABILITY_KINDS = ("instance_prob", "class_aware")


@dataclass
class HeatmapResult:
    """Files written for one slide.

    Attributes:
        slide_id (str): Slide id.
        png (Path): The figure.
        overlay (Path): The RGBA overlay at thumbnail size.
        thumbnail_size (tuple[int, int]): ``(width, height)`` of the thumbnail.
        geojson (Path | None): GeoJSON of the scored patches.
        store (Path | None): TIAToolbox SQLiteStore of the scored patches.
        background (str): ``"slide"`` or ``"blank"`` (no slide image found).
    """

    slide_id: str
    png: Path
    overlay: Path
    thumbnail_size: tuple[int, int]
    geojson: Path | None = None
    store: Path | None = None
    background: str = "slide"


def patch_size_level0(slide: SlideScores) -> tuple[float, float]:
    """Patch ``(width, height)`` in level-0 pixels: stored, else the coordinate step."""
    size = slide.meta.get("patch_size_level0")
    if size is not None:
        values = [float(v) for v in np.atleast_1d(size)]
        return (values[0], values[-1])
    if slide.coords is None or len(slide.coords) == 0:
        msg = f"{slide.slide_id}: no patch coordinates; cannot draw a heatmap."
        raise DataError(msg)
    steps = []
    for axis in (0, 1):
        values = np.unique(slide.coords[:, axis])
        diffs = np.diff(values)
        steps.append(float(diffs[diffs > 0].min()) if (diffs > 0).any() else 1.0)
    step = min(steps)
    return (step, step)


def _level0_dimensions(
    slide: SlideScores, patch: tuple[float, float]
) -> tuple[int, int]:
    dims = slide.meta.get("level0_dimensions")
    if dims is not None and len(dims) == 2:
        return (int(dims[0]), int(dims[1]))
    assert slide.coords is not None  # checked by patch_size_level0
    return (
        math.ceil(slide.coords[:, 0].max() + patch[0]),
        math.ceil(slide.coords[:, 1].max() + patch[1]),
    )


def read_thumbnail(
    path: str | Path, max_size: int = 1024
) -> tuple[np.ndarray, tuple[int, int]]:
    """A thumbnail of at most ``max_size`` pixels a side, and the level-0 size.

    Read with TIAToolbox (``open_slide``, then ``slide_thumbnail`` in ``baseline``
    units, so slides without resolution metadata work too).

    Returns:
        tuple: ``(RGB uint8 [h, w, 3], (level-0 width, level-0 height))``.
    """
    from tiahnm.slides.reader import open_slide

    slide = open_slide(path, units="baseline")
    try:
        width, height = slide.dimensions
        scale = min(1.0, max_size / max(width, height))
        thumb = np.asarray(
            slide.reader.slide_thumbnail(resolution=scale, units="baseline")
        )
    finally:
        slide.close()
    if thumb.ndim == 2:
        thumb = np.repeat(thumb[..., None], 3, axis=2)
    return np.ascontiguousarray(thumb[..., :3], dtype=np.uint8), (width, height)


SCALES = ("auto", "validation", "fixed", "minmax", "percentile")


def scale_scores(
    scores: np.ndarray,
    kind: str | None,
    mode: str = "auto",
    *,
    reference: dict[str, Any] | None = None,
    class_names: dict[int, str] | None = None,
) -> tuple[np.ndarray, str, str]:
    """Scores mapped to the 0-1 colour scale on which the threshold applies.

    Args:
        scores (np.ndarray): ``[N]`` raw instance scores.
        kind (str | None): The score kind stored with the scores.
        mode (str): ``validation`` (relative to the run's validation patch scores,
            :mod:`tiahnm.evaluation.reference`: 0 at the highest patch score of the
            negative validation slides, 1 at the 99th percentile of positive ones;
            scores at or below that highest one map below 0 and are not painted),
            ``fixed`` (raw scores, clipped to 0-1: for
            probabilities), ``minmax`` (the slide's range mapped to 0-1),
            ``percentile`` (each score's percentile rank within the slide, as CLAM's
            heatmaps), or ``auto`` (``validation`` when a reference is given, else
            ``fixed`` for probability kinds and scores within 0-1, else ``minmax``).
        reference (dict | None): The fold's validation reference.
        class_names (dict[int, str] | None): Names of the labels, for the caption.

    Returns:
        tuple: ``(values [N], resolved mode, colour-bar label)``.

    Raises:
        ValueError: Unknown mode, or ``validation`` without a reference.
    """
    from tiahnm.evaluation.reference import REFERENCE_HIGH, reference_range

    if mode not in SCALES:
        msg = f"scale must be one of {', '.join(SCALES)}, got {mode!r}."
        raise ValueError(msg)
    s = np.asarray(scores, dtype=np.float64)
    finite = s[np.isfinite(s)]
    name = kind or "instance score"
    bounds = reference_range(reference)
    if mode == "validation" and bounds is None:
        msg = "the validation scale needs the run's validation reference (none stored)."
        raise ValueError(msg)
    if mode == "auto":
        in_unit = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
        if bounds is not None:
            mode = "validation"
        else:
            mode = "fixed" if kind in PROBABILITY_KINDS or in_unit else "minmax"
    if mode == "validation":
        assert bounds is not None
        lo, hi = bounds
        neg = _label_text(0, class_names)
        pos = _label_text(1, class_names)
        label = (
            f"{name} {lo:.4g} to {hi:.4g}: painted above every patch of the {neg}\n"
            f"validation slides, full colour at the {REFERENCE_HIGH}th percentile of "
            f"{pos} ones"
        )
        values = (s - lo) / (hi - lo)
        # strictly above the cut-off: patches tied at it (the bias) stay unpainted
        values[s <= lo] = np.minimum(values[s <= lo], -1e-9)
        return values, mode, label
    if mode == "fixed":
        return np.clip(s, 0.0, 1.0), mode, f"{name} (raw, 0-1)"
    if mode == "percentile":
        from scipy.stats import rankdata

        ranks = rankdata(s, method="average")
        values = (ranks - 1) / max(len(s) - 1, 1)
        return values, mode, f"percentile of {name} in the slide"
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    values = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    return values, mode, f"{name}, slide min-max ({lo:.3g} to {hi:.3g})"


def default_threshold(mode: str, fixed_threshold: float = 0.5) -> float:
    """The threshold a scale uses unless one is given.

    0 on the ``validation`` scale (the highest patch score of the negative
    validation slides), ``fixed_threshold`` on the fixed scale, else 0.5.
    """
    return {"validation": 0.0, "fixed": fixed_threshold}.get(mode, 0.5)


def overlay_rgba(
    slide: SlideScores,
    size: tuple[int, int],
    level0: tuple[int, int],
    *,
    threshold: float,
    values: np.ndarray | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> np.ndarray:
    """RGBA ``[h, w, 4]`` uint8 overlay of the patch scores at thumbnail ``size``.

    Overlapping patches show their highest value. Pixels outside patches and patches
    whose value is below ``threshold`` have alpha 0.

    Args:
        slide (SlideScores): Scores and level-0 coordinates.
        size (tuple[int, int]): Thumbnail ``(width, height)``.
        level0 (tuple[int, int]): Level-0 ``(width, height)``.
        threshold (float): Values below it are transparent.
        values (np.ndarray | None): ``[N]`` values on the 0-1 colour scale
            (:func:`scale_scores`; values above 1 get the top colour); default the
            raw scores.
        cmap (str): Matplotlib colour map.
        alpha (float): Opacity of the drawn patches.
    """
    from matplotlib import colormaps

    width, height = size
    sx, sy = width / level0[0], height / level0[1]
    pw, ph = patch_size_level0(slide)
    grid = np.full((height, width), -np.inf, dtype=np.float64)
    assert slide.coords is not None  # checked by patch_size_level0
    values = slide.scores if values is None else values
    for (x, y), s in zip(slide.coords, values, strict=True):
        x0, y0 = math.floor(x * sx), math.floor(y * sy)
        x1 = max(x0 + 1, math.ceil((x + pw) * sx))
        y1 = max(y0 + 1, math.ceil((y + ph) * sy))
        x0, y0 = max(x0, 0), max(y0, 0)
        if x0 >= width or y0 >= height:
            continue
        cell = grid[y0:y1, x0:x1]
        np.maximum(cell, s, out=cell)
    drawn = np.isfinite(grid) & (grid >= threshold)
    rgba = colormaps[cmap](np.clip(np.where(np.isfinite(grid), grid, 0.0), 0, 1))
    out = (np.clip(rgba, 0, 1) * 255).round().astype(np.uint8)
    out[..., 3] = np.where(drawn, round(alpha * 255), 0).astype(np.uint8)
    return out


def outline_rings(annotations: str | Path | None, slide_id: str) -> list[np.ndarray]:
    """Exterior rings (level-0 ``[K, 2]``) of a slide's GeoJSON / ASAP XML annotation.

    Args:
        annotations (str | Path | None): An annotation file or a folder of them
            (matched by slide id).
        slide_id (str): The slide.
    """
    if not annotations:
        return []
    from tiahnm.slides.annotations import find_annotation, read_asap_xml, read_geojson

    path = find_annotation(annotations, slide_id)
    if path is None or path.suffix.lower() not in (".geojson", ".json", ".xml"):
        return []
    reader = read_asap_xml if path.suffix.lower() == ".xml" else read_geojson
    geom = reader(path)
    polygons = getattr(geom, "geoms", [geom])
    return [np.asarray(p.exterior.coords) for p in polygons if hasattr(p, "exterior")]


def _label_text(value: int, names: dict[int, str] | None) -> str:
    if value < 0:
        return "unknown"
    return names.get(value, str(value)) if names else str(value)


def render_heatmap(
    slide: SlideScores,
    output_dir: str | Path,
    *,
    slide_path: str | Path | None = None,
    kind: str | None = None,
    threshold: float | None = None,
    fixed_threshold: float = 0.5,
    max_size: int = 1024,
    cmap: str = "jet",
    alpha: float = 0.5,
    scale: str = "auto",
    class_names: dict[int, str] | None = None,
    geojson: bool = False,
    store: bool = False,
    outlines: Sequence[np.ndarray] | None = None,
    reference: dict[str, Any] | None = None,
) -> HeatmapResult:
    """Draw one slide's heatmap (and optionally its GeoJSON / annotation store).

    Args:
        slide (SlideScores): Stored scores of the slide.
        output_dir (str | Path): Output folder (created).
        slide_path (str | Path | None): The slide image; default the ``slide_path``
            stored with the scores. Without one, the scores are drawn on white.
        kind (str | None): Score kind (for the colour scale and the caption).
        threshold (float | None): Patches whose value on the 0-1 colour scale is
            below it are transparent (with the ``fixed`` scale: the raw probability).
            None: :func:`default_threshold`.
        fixed_threshold (float): Default threshold on the fixed scale (the
            instance threshold stored with the scores).
        max_size (int): Longest side of the thumbnail in pixels.
        cmap (str): Matplotlib colour map.
        alpha (float): Opacity of the drawn patches.
        scale (str): Colour scale, see :func:`scale_scores`.
        class_names (dict[int, str] | None): Names of the label indices.
        geojson (bool): Also write ``<slide_id>.geojson``.
        store (bool): Also write ``<slide_id>.db`` (TIAToolbox ``SQLiteStore``).
        outlines (Sequence[np.ndarray] | None): ``[K, 2]`` polygon rings in level-0
            pixels (e.g. annotated tumour regions), drawn as black lines on the figure.
        reference (dict | None): The fold's validation reference (for the scale).

    Returns:
        HeatmapResult: The files written.

    Raises:
        DataError: No coordinates, or the stored slide cannot be read.
    """
    from PIL import Image

    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patch = patch_size_level0(slide)
    path = slide_path or slide.meta.get("slide_path")
    background = "slide"
    if path and Path(path).is_file():
        thumb, level0 = read_thumbnail(path, max_size)
    else:
        if path:
            logger.warning(
                "%s: slide %s not found; drawing on white (use --slides).",
                slide.slide_id,
                path,
            )
        level0 = _level0_dimensions(slide, patch)
        factor = min(1.0, max_size / max(level0))
        size = (max(1, round(level0[0] * factor)), max(1, round(level0[1] * factor)))
        thumb = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
        background = "blank"
    height, width = thumb.shape[:2]
    values, mode, bar_label = scale_scores(
        slide.scores, kind, scale, reference=reference, class_names=class_names
    )
    if threshold is None:
        threshold = default_threshold(mode, fixed_threshold)
    size = (width, height)
    rgba = overlay_rgba(
        slide, size, level0, threshold=threshold, values=values, cmap=cmap, alpha=alpha
    )
    stem = _safe_name(slide.slide_id)
    overlay_path = out_dir / f"{stem}_overlay.png"
    with atomic_path(overlay_path) as tmp:
        Image.fromarray(rgba, mode="RGBA").save(tmp, format="PNG", compress_level=3)
    png = out_dir / f"{stem}.png"
    rings = [
        np.asarray(r, dtype=np.float64) * (width / level0[0], height / level0[1])
        for r in outlines or ()
    ]
    _figure(slide, thumb, rgba, png, bar_label, threshold, cmap, class_names, rings)
    result = HeatmapResult(
        slide.slide_id, png, overlay_path, (width, height), background=background
    )
    if geojson:
        result.geojson = write_geojson(slide, out_dir / f"{stem}.geojson", kind=kind)
    if store:
        result.store = write_annotation_store(slide, out_dir / f"{stem}.db", kind=kind)
    return result


def _safe_name(slide_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in slide_id)


def _figure(
    slide: SlideScores,
    thumb: np.ndarray,
    rgba: np.ndarray,
    path: Path,
    bar_label: str,
    threshold: float,
    cmap: str,
    class_names: dict[int, str] | None,
    rings: Sequence[np.ndarray] = (),
) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    height, width = thumb.shape[:2]
    # one composited image: half the drawing work of two layered imshows
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    blend = (thumb * (1 - a) + rgba[..., :3] * a).round().astype(np.uint8)
    dpi = 100
    img_w = 6.0  # inches of image; the bar and title get fixed margins
    img_h = img_w * height / width
    fig = Figure(figsize=(img_w + 1.6, img_h + 0.9), dpi=dpi)
    FigureCanvasAgg(fig)
    fw, fh = img_w + 1.6, img_h + 0.9
    ax = fig.add_axes((0.1 / fw, 0.1 / fh, img_w / fw, img_h / fh))
    cax = fig.add_axes(((img_w + 0.25) / fw, 0.1 / fh, 0.18 / fw, img_h / fh))
    ax.imshow(blend, interpolation="nearest")
    for ring in rings:
        ax.plot(ring[:, 0], ring[:, 1], color="black", lw=1.0)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    pred = _label_text(slide.prediction, class_names)
    positive = _label_text(1, class_names)
    prob = (
        ""
        if math.isnan(slide.probability)
        else f" (p({positive}) = {slide.probability:.2f})"
    )
    ax.set_title(
        f"{slide.slide_id}\nlabel: {_label_text(slide.label, class_names)}   "
        f"prediction: {pred}{prob}",
        fontsize=10,
    )
    bar = fig.colorbar(
        ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormaps[cmap]), cax=cax
    )
    shown = "" if threshold == 0.0 else f"; shown where >= {threshold:g}"
    bar.set_label(f"{bar_label}{shown}", fontsize=8)
    if 0.0 <= threshold <= 1.0:
        bar.ax.axhline(threshold, color="black", lw=1.2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", pil_kwargs={"compress_level": 3})


def _boxes(slide: SlideScores) -> tuple[np.ndarray, tuple[float, float]]:
    patch = patch_size_level0(slide)
    assert slide.coords is not None
    return np.asarray(slide.coords, dtype=np.float64), patch


def write_geojson(
    slide: SlideScores, path: str | Path, *, kind: str | None = None
) -> Path:
    """GeoJSON FeatureCollection: one level-0 polygon per patch with its ``score``."""
    coords, (pw, ph) = _boxes(slide)
    features = []
    for i, ((x, y), s) in enumerate(zip(coords, slide.scores, strict=True)):
        props: dict[str, Any] = {"score": float(s), "index": i}
        if slide.instance_labels is not None:
            props["instance_label"] = int(slide.instance_labels[i])
        ring = [[x, y], [x + pw, y], [x + pw, y + ph], [x, y + ph], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[float(a), float(b)] for a, b in ring]],
                },
                "properties": props,
            }
        )
    doc = {
        "type": "FeatureCollection",
        "properties": {
            "slide_id": slide.slide_id,
            "score_kind": kind,
            "coordinates": "level-0 pixels",
        },
        "features": features,
    }
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    return path


def write_annotation_store(
    slide: SlideScores, path: str | Path, *, kind: str | None = None
) -> Path:
    """TIAToolbox ``SQLiteStore`` of the patches (``score`` and ``type`` properties).

    Open it in TIAToolbox's viewer with the slide: ``tiatoolbox visualize --slides
    SLIDE_DIR --overlays HEATMAP_DIR`` and colour by ``score``.
    """
    from shapely.geometry import box
    from tiatoolbox.annotation.storage import Annotation, SQLiteStore

    coords, (pw, ph) = _boxes(slide)
    annotations = []
    for i, ((x, y), s) in enumerate(zip(coords, slide.scores, strict=True)):
        props: dict[str, Any] = {"score": float(s), "type": kind or "patch"}
        if slide.instance_labels is not None:
            props["instance_label"] = int(slide.instance_labels[i])
        annotations.append(Annotation(box(x, y, x + pw, y + ph), props))
    path = Path(path)
    with atomic_path(path) as tmp, sqlite_store_compat():
        tmp.unlink()  # SQLite makes its own file
        db = SQLiteStore(tmp, auto_commit=False)
        try:
            db.append_many(annotations)
            db.commit()
        finally:
            db.close()
            # its __del__ closes again, reconnecting to the file: let that happen
            # now, before the rename, not later on a path that no longer exists
            del db
    return path


@contextlib.contextmanager
def sqlite_store_compat() -> Iterator[None]:
    """Let TIAToolbox's ``SQLiteStore`` work where sqlite3 cannot load extensions.

    ``SQLiteStore.compile_options`` (TIAToolbox 2.1.3) calls
    ``sqlite3.Connection.enable_load_extension``, which Pythons built without
    loadable-extension support lack (``AttributeError`` on opening any store). Inside
    this block it reads the compile options without that call; the class is restored
    afterwards. A no-op where the method exists.
    """
    import sqlite3

    from tiatoolbox.annotation.storage import SQLiteStore

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        yield
        return
    original = SQLiteStore.__dict__["compile_options"]

    def compile_options() -> list[str]:
        with sqlite3.connect(":memory:") as conn:
            rows = conn.execute("pragma compile_options").fetchall()
        return [opt for (opt,) in rows]

    SQLiteStore.compile_options = staticmethod(compile_options)  # type: ignore[method-assign]
    try:
        yield
    finally:
        SQLiteStore.compile_options = original  # type: ignore[method-assign]


__all__ = [
    "HeatmapResult",
    "default_threshold",
    "outline_rings",
    "overlay_rgba",
    "read_thumbnail",
    "render_heatmap",
    "scale_scores",
    "sqlite_store_compat",
    "write_annotation_store",
    "write_geojson",
]
