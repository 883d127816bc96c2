"""``report.html``: metrics, curves, slide viewers and patch galleries, offline.

Galleries show the top, bottom and mined patches.

Written beside ``report.md`` for every run (the ``report`` stage, ``tiahnm report
RUN_DIR``) and for ``tiahnm predict`` outputs. Nothing is fetched from a network: the
viewer is OpenSeadragon (shipped as package data, ``assets/openseadragon``), the
slide is a pre-rendered Deep Zoom pyramid read through TIAToolbox
(:mod:`tiahnm.evaluation.tiles`), and the data is a ``<script>`` file, so the folder
works opened from ``file://``.

Folder layout (``OUT`` is the run or predict folder)::

    OUT/report.html
    OUT/report_files/{data.js, report.js, report.css, openseadragon/, *.png}
    OUT/report_files/slides/<slide>_files/<level>/<col>_<row>.jpg   (DZI)
    OUT/galleries/<slide>/{top,bottom}_<rank>.png                    (ranked patches)
    OUT/galleries/mined/<fold>/<kind>/<step>_<slide>_<rank>.png     (mined patches)
"""

from __future__ import annotations

import html
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiahnm.errors import DataError
from tiahnm.evaluation.scores import SlideScores
from tiahnm.utils.io import atomic_open

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
FILES = "report_files"
#: Longest side of a slide's Deep Zoom pyramid (bounds the folder's size).
VIEWER_MAX_SIZE = 4096
#: Patches per ranked gallery (top and bottom each).
GALLERY_K = 8
#: Side of a gallery patch in pixels.
PATCH_PX = 96
#: Steps (epochs, rounds) and patches per step shown in a mined gallery.
MINED_STEPS, MINED_PATCHES = 5, 8


@dataclass
class ReportOptions:
    """What :func:`write_html_report` draws.

    Attributes:
        k (int): Top / bottom patches per slide.
        max_size (int): Longest side of each slide's viewer pyramid.
        slides (int): At most this many slides get a viewer and galleries (-1: all).
    """

    k: int = GALLERY_K
    max_size: int = VIEWER_MAX_SIZE
    slides: int = -1


@dataclass
class _Context:
    out: Path
    files: Path
    class_names: dict[int, str] | None
    annotations: str | None
    options: ReportOptions
    timings: dict[str, float] = field(default_factory=dict)


def _name(value: int, names: dict[int, str] | None) -> str:
    if value < 0:
        return "unknown"
    return names.get(value, str(value)) if names else str(value)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def _png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=1)


# ----------------------------------------------------------------- slide section
def _collect_slides(out: Path) -> list[tuple[SlideScores, dict[str, Any]]]:
    """Each slide once (first repeat), with its file's attributes."""
    from tiahnm.evaluation.scores import find_score_files, read_instance_scores

    seen: dict[str, tuple[SlideScores, dict[str, Any]]] = {}
    try:
        files = find_score_files(out)
    except DataError:
        return []
    for path in files:
        slides, attrs = read_instance_scores(path)
        for s in slides:
            if s.coords is not None and len(s.coords) and s.slide_id not in seen:
                seen[s.slide_id] = (s, attrs)
    return [seen[k] for k in sorted(seen)]


def _grid(slide: SlideScores, values: np.ndarray) -> dict[str, Any]:
    """Patch values on a regular grid (cell = the coordinate step), row-major."""
    from tiahnm.evaluation.heatmap import patch_size_level0

    coords = np.asarray(slide.coords, dtype=np.float64)
    pw, ph = patch_size_level0(slide)
    steps = []
    for axis, size in ((0, pw), (1, ph)):
        diffs = np.diff(np.unique(coords[:, axis]))
        diffs = diffs[diffs > 0]
        steps.append(float(min(diffs.min(), size)) if diffs.size else size)
    x0, y0 = coords.min(0)
    cols = np.floor((coords[:, 0] - x0) / steps[0]).astype(int)
    rows = np.floor((coords[:, 1] - y0) / steps[1]).astype(int)
    n_cols, n_rows = int(cols.max()) + 1, int(rows.max()) + 1
    grid = np.full(n_rows * n_cols, -np.inf)
    np.maximum.at(grid, rows * n_cols + cols, values)
    cells = [None if not np.isfinite(v) else round(float(v), 4) for v in grid]
    return {
        "x": float(x0),
        "y": float(y0),
        "w": n_cols * steps[0],
        "h": n_rows * steps[1],
        "cols": n_cols,
        "rows": n_rows,
        "values": cells,
    }


def _slide_image(ctx: _Context, slide: SlideScores) -> tuple[np.ndarray, tuple, bool]:
    """The viewer's top level (read with TIAToolbox), or white without a slide."""
    from tiahnm.evaluation.heatmap import _level0_dimensions, patch_size_level0
    from tiahnm.evaluation.tiles import read_slide_image

    path = slide.meta.get("slide_path")
    if path and Path(path).is_file():
        image, level0 = read_slide_image(path, ctx.options.max_size)
        return image, level0, True
    level0 = _level0_dimensions(slide, patch_size_level0(slide))
    f = min(1.0, 1024 / max(level0))
    shape = (max(1, round(level0[1] * f)), max(1, round(level0[0] * f)), 3)
    return np.full(shape, 255, dtype=np.uint8), level0, False


def _ranked_gallery(
    ctx: _Context, slide: SlideScores, image: np.ndarray, level0: tuple, *, found: bool
) -> dict[str, list[dict[str, Any]]]:
    """Top-k and bottom-k patches by score: PNGs in ``galleries/<slide>/``."""
    from tiahnm.evaluation.heatmap import patch_size_level0
    from tiahnm.evaluation.tiles import read_patches

    if not found:
        return {}
    k = min(ctx.options.k, len(slide.scores))
    order = np.argsort(-np.asarray(slide.scores, dtype=np.float64), kind="stable")
    picks = {"top": order[:k], "bottom": order[::-1][:k]}
    pw, ph = patch_size_level0(slide)
    scale = image.shape[1] / level0[0]
    out: dict[str, list[dict[str, Any]]] = {}
    folder = ctx.out / "galleries" / _safe(slide.slide_id)
    for which, idx in picks.items():
        coords = [slide.coords[i] for i in idx]
        if pw * scale >= PATCH_PX / 2:  # the viewer image is sharp enough: crop it
            crops = [_crop(image, c, (pw, ph), scale) for c in coords]
        else:
            crops = read_patches(slide.meta["slide_path"], coords, (pw, ph), PATCH_PX)
        items = []
        for rank, (i, crop) in enumerate(zip(idx, crops, strict=True), start=1):
            path = folder / f"{which}_{rank:02d}.png"
            _png(crop, path)
            item = {"png": path, "score": float(slide.scores[i]), "index": int(i)}
            if slide.instance_labels is not None:
                item["patch_label"] = int(slide.instance_labels[i])
            items.append(item)
        out[which] = items
    return out


def _crop(image: np.ndarray, xy: Any, size: tuple, scale: float) -> np.ndarray:
    from PIL import Image

    x0, y0 = round(xy[0] * scale), round(xy[1] * scale)
    x1, y1 = round((xy[0] + size[0]) * scale), round((xy[1] + size[1]) * scale)
    crop = image[max(y0, 0) : max(y1, y0 + 1), max(x0, 0) : max(x1, x0 + 1)]
    return np.asarray(Image.fromarray(crop).resize((PATCH_PX, PATCH_PX)))


def _slide_entry(
    ctx: _Context, slide: SlideScores, attrs: dict[str, Any]
) -> dict[str, Any]:
    """Viewer data (tiles, overlay grid, outlines) and galleries of one slide."""
    from tiahnm.evaluation.heatmap import default_threshold, outline_rings, scale_scores
    from tiahnm.evaluation.reference import parse_reference, reference_range
    from tiahnm.evaluation.tiles import write_deep_zoom

    t0 = time.perf_counter()
    image, level0, found = _slide_image(ctx, slide)
    dz = write_deep_zoom(
        image, level0, ctx.files / "slides" / f"{_safe(slide.slide_id)}_files"
    )
    t1 = time.perf_counter()
    gallery = _ranked_gallery(ctx, slide, image, level0, found=found)
    ctx.timings["tiles"] = ctx.timings.get("tiles", 0.0) + t1 - t0
    ctx.timings["galleries"] = ctx.timings.get("galleries", 0.0) + (
        time.perf_counter() - t1
    )
    reference = parse_reference(attrs.get("val_reference"))
    kind = attrs.get("score_kind")
    values, mode, label = scale_scores(
        slide.scores, kind, reference=reference, class_names=ctx.class_names
    )
    stored = attrs.get("instance_threshold")
    threshold = default_threshold(mode, 0.5 if stored in (None, "") else float(stored))
    bounds = reference_range(reference) if mode == "validation" else None
    if mode == "fixed":
        bounds = (0.0, 1.0)
    label_name = _name(slide.label, ctx.class_names)
    pred = _name(slide.prediction, ctx.class_names)
    positive = _name(1, ctx.class_names)
    prob = "" if math.isnan(slide.probability) else f"{slide.probability:.2f}"
    rings = outline_rings(ctx.annotations, slide.slide_id) if ctx.annotations else []
    return {
        "id": slide.slide_id,
        "option": f"{slide.slide_id}: label {label_name}, prediction {pred}",
        "title": f"{slide.slide_id}: label {label_name}, prediction {pred}"
        + (f" (p({positive}) = {prob})" if prob else "")
        + ("" if found else " (slide image not found: patches on white)"),
        "tile_source": dz.tile_source(ctx.out),
        "level0": [int(level0[0]), int(level0[1])],
        "grid": _grid(slide, values),
        "n_patches": len(slide.scores),
        "scale_label": f"Colour scale ({mode}): {label.replace(chr(10), ' ')}",
        "threshold": float(threshold),
        "range": [float(min(0.0, max(-1.0, float(np.min(values))))), 1.0],
        "raw": list(bounds) if bounds else None,
        "outlines": [np.asarray(r)[:, :2].round(1).tolist() for r in rings],
        "gallery": gallery,
        "n_tiles": dz.n_tiles,
    }


# ----------------------------------------------------------------- mined section
def _mined_crops(records: list[dict[str, Any]]) -> dict[int, list[Any]]:
    """Patches of the shown records, read with one slide opening per slide.

    Returns:
        dict: ``id(record)`` to a list of crops (None where none can be read).
    """
    from tiahnm.evaluation.scores import feature_file_meta
    from tiahnm.evaluation.tiles import read_patches

    metas: dict[str, dict[str, Any]] = {}
    wanted: dict[tuple[str, tuple[float, float]], list[tuple[int, int, Any]]] = {}
    out: dict[int, list[Any]] = {}
    for rec in records:
        n = len(rec["indices"][:MINED_PATCHES])
        out[id(rec)] = [None] * n
        src = str(rec.get("source") or "")
        meta = metas.setdefault(src, feature_file_meta(src))
        path, size = meta.get("slide_path"), meta.get("patch_size_level0")
        if not meta and rec.get("patch_size_level0"):  # a slide-patch bag
            path, size = src, rec["patch_size_level0"]
        coords = (rec.get("coords") or [])[:n]
        if path and size is not None and coords and Path(path).is_file():
            sz = [float(v) for v in np.atleast_1d(size)]
            todo = wanted.setdefault((path, (sz[0], sz[-1])), [])
            todo += [(id(rec), k, xy) for k, xy in enumerate(coords)]
    for (path, size), todo in wanted.items():
        crops = read_patches(path, [xy for _, _, xy in todo], size, PATCH_PX)
        for (rid, k, _), crop in zip(todo, crops, strict=True):
            out[rid][k] = crop
    return out


def _mined_sections(ctx: _Context) -> list[dict[str, Any]]:
    """Galleries of what the miner recorded (first fold with a ``mined.json``)."""
    files = sorted(ctx.out.glob("folds/*/mined.json"))
    if not files:
        return []
    doc = json.loads(files[0].read_text(encoding="utf-8"))
    fold = files[0].parent.name
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for rec in doc.get("records", []):
        by_kind.setdefault(rec["kind"], []).append(rec)
    shown: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for kind, recs in by_kind.items():
        steps = list(dict.fromkeys(r["step"] for r in recs))
        if len(steps) > MINED_STEPS:  # first, evenly spaced, last
            picks = np.linspace(0, len(steps) - 1, MINED_STEPS).round().astype(int)
            steps = [steps[i] for i in sorted(set(picks))]
        shown[kind] = [(st, [r for r in recs if r["step"] == st]) for st in steps]
    crops = _mined_crops([r for rows in shown.values() for _, rs in rows for r in rs])
    sections = []
    for kind, rows in shown.items():
        folder = ctx.out / "galleries" / "mined" / fold / _safe(kind)
        out_rows = []
        for step, recs in rows:
            items = []
            for rec in recs:
                for rank, crop in enumerate(crops[id(rec)], start=1):
                    item = {
                        "slide_id": rec["slide_id"],
                        "index": rec["indices"][rank - 1],
                        "png": None,
                    }
                    if rec.get("scores"):
                        item["score"] = rec["scores"][rank - 1]
                    if crop is not None:
                        name = f"{_safe(step)}_{_safe(rec['slide_id'])}_{rank:02d}.png"
                        _png(crop, folder / name)
                        item["png"] = folder / name
                    items.append(item)
            out_rows.append({"step": step, "items": items})
        n = len(by_kind[kind])
        sections.append({"kind": kind, "fold": fold, "rows": out_rows, "n": n})
    return sections


# ----------------------------------------------------------------- metrics section
def _metrics_html(ctx: _Context, summary: dict[str, Any], results: list) -> str:
    """Metric tables with CIs, the curves and the per-fold table."""
    from tiahnm.evaluation.curves import plot_calibration, plot_pr
    from tiahnm.evaluation.metrics import INSTANCE_METRICS, pooled_predictions
    from tiahnm.evaluation.report import _fmt, metric_cells, plot_confusion, plot_roc
    from tiahnm.training.metrics import METRICS

    def table(keys: list[str]) -> str:
        rows = [
            f"<tr><td>{html.escape(name)}</td><td>{spread}</td><td>{pooled}</td>"
            f"<td>{ci}</td></tr>"
            for name, spread, pooled, ci in metric_cells(summary, keys, "{} to {}")
        ]
        if not rows:
            return ""
        head = (
            "<tr><th>metric</th><th>mean ± std over folds</th><th>pooled</th>"
            "<th>95% CI (pooled)</th></tr>"
        )
        return f"<table>{head}{''.join(rows)}</table>"

    from tiahnm.tasks import task_from_spec

    spec = summary.get("task_spec")
    keys = list(task_from_spec(spec).report_metrics) if spec else list(METRICS)
    # {} for survival and regression rows (no class probability): no ROC/PR/calibration
    pooled = pooled_predictions(results)
    positive = _name(1, ctx.class_names)
    plots = [
        ("roc.png", plot_roc, "ROC"),
        ("pr.png", plot_pr, "Precision-recall"),
        ("calibration.png", None, "Calibration (reliability diagram)"),
        ("confusion.png", plot_confusion, "Confusion matrix"),
    ]
    figs = []
    km = ctx.out / "km.png"  # written with report.md by survival tasks
    if km.is_file():
        shutil.copyfile(km, ctx.files / km.name)
        figs.append(
            f'<figure><img src="{FILES}/{km.name}" alt="Kaplan-Meier curves of the '
            'risk groups"></figure>'
        )
    for name, fn, alt in plots if pooled else []:
        path = ctx.files / name
        if fn is None:
            made = plot_calibration(pooled, path, positive=positive)
        elif fn is plot_confusion:
            made = plot_confusion(pooled, path, ctx.class_names)
        else:
            made = fn(pooled, path)
        if made:
            figs.append(f'<figure><img src="{FILES}/{name}" alt="{alt}"></figure>')
    ci = summary.get("ci") or {}
    ci_note = (
        f"95% CI: {html.escape(str(ci.get('method')))}; {ci.get('n_resamples')} "
        f"resamples, seed {ci.get('seed')}."
        if ci
        else ""
    )
    folds = "".join(
        f"<tr><td>{r['repeat']}</td><td>{r['fold']}</td><td>{r.get('best_epoch', '-')}"
        f"</td><td>{_fmt(r.get('threshold'))}</td><td>{_fmt(r['metrics'].get('auc'))}"
        f"</td><td>{_fmt(r['metrics'].get('accuracy'))}</td>"
        f"<td>{r.get('n_test', len(r['predictions']))}</td></tr>"
        for r in results
    )
    names = ctx.class_names or {}
    classes = ", ".join(f"{k} = {html.escape(v)}" for k, v in names.items())
    return (
        '<section id="metrics"><h2>Slide-level test metrics</h2>'
        + (f"<p>Classes: {classes}.</p>" if classes else "")
        + table([*keys, "loss"])
        + f"<p class='note'>Epoch and decision threshold chosen on each fold's "
        f"validation slides only. {ci_note}</p>"
        + (
            "<h3>Instance-level test metrics (patch labels)</h3>"
            + table(list(INSTANCE_METRICS))
            if any(k in summary.get("metrics", {}) for k in INSTANCE_METRICS)
            else ""
        )
        + f"<div class='figs'>{''.join(figs)}</div>"
        + "<h3>Folds</h3><table><tr><th>repeat</th><th>fold</th><th>best epoch</th>"
        "<th>threshold</th><th>AUC</th><th>accuracy</th><th>n test</th></tr>"
        + folds
        + "</table></section>"
    )


# ----------------------------------------------------------------- HTML
def _img(ctx: _Context, path: Path | None, caption: str) -> str:
    if path is None:
        return (
            f"<figure class='patch missing'><figcaption>{caption}</figcaption></figure>"
        )
    rel = path.relative_to(ctx.out).as_posix()
    return (
        f"<figure class='patch'><img src='{html.escape(rel)}' loading='lazy' alt=''>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _patch_caption(ctx: _Context, item: dict[str, Any]) -> str:
    text = f"#{item['index']}"
    if "score" in item:
        text += f" s={item['score']:.3g}"
    if "patch_label" in item:
        text += " " + html.escape(_name(item["patch_label"], ctx.class_names))
    return text


def _galleries_html(ctx: _Context, slides: list[dict[str, Any]]) -> str:
    parts = []
    for s in slides:
        g = s["gallery"]
        if not g:
            continue
        rows = "".join(
            f"<h4>{which} {len(items)} patches by score</h4><div class='strip'>"
            + "".join(_img(ctx, it["png"], _patch_caption(ctx, it)) for it in items)
            + "</div>"
            for which, items in g.items()
        )
        parts.append(
            f"<details><summary>{html.escape(s['title'])}</summary>{rows}</details>"
        )
    return (
        "<section id='galleries'><h2>Top and bottom patches per slide</h2>"
        "<p class='note'>Ranked by the evaluated patch score (the heatmap's); also in "
        "<code>galleries/&lt;slide&gt;/</code>. Patch labels shown when annotated.</p>"
        + "".join(parts)
        + "</section>"
    )


def _mined_html(ctx: _Context, sections: list[dict[str, Any]], miner: str) -> str:
    if not sections:
        return (
            "<section id='mined'><h2>What the miner mined</h2><p class='note'>Miner "
            f"<code>{html.escape(str(miner))}</code> recorded nothing (plain training, "
            "or a miner that does not call <code>Miner.record_mined</code>).</p>"
            "</section>"
        )
    parts = []
    for sec in sections:
        rows = "".join(
            f"<h4>{html.escape(row['step'])}</h4><div class='strip'>"
            + "".join(
                _img(
                    ctx,
                    it["png"],
                    html.escape(it["slide_id"]) + " " + _patch_caption(ctx, it),
                )
                for it in row["items"]
            )
            + "</div>"
            for row in sec["rows"]
        )
        parts.append(
            f"<h3>{html.escape(sec['kind'])}</h3><p class='note'>Fold {sec['fold']}, "
            f"{sec['n']} records; PNGs in <code>galleries/mined/{sec['fold']}/</code>."
            f"</p>{rows}"
        )
    return (
        f"<section id='mined'><h2>What the miner mined ({html.escape(str(miner))})"
        "</h2>" + "".join(parts) + "</section>"
    )


VIEWER_HTML = """<section id="viewer-section"><h2>Slide viewer</h2>
<div class="controls">
<label>Slide <select id="slide"></select></label>
<label>Opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.55">
</label>
<label>Threshold <input id="threshold" type="range"> <span id="threshold-value"></span>
</label>
<label id="outlines-row"><input id="outlines" type="checkbox" checked> annotation
outlines</label> <span id="overlay-count" class="note"></span>
</div>
<h3 id="slide-title"></h3>
<div id="viewer"></div>
<div id="colour-bar"></div><div class="bar-ends"><span>0</span><span>1</span></div>
<p id="scale-label" class="note"></p>
<p class="note">Patches whose colour value is below the threshold are not painted;
values above 1 get the top colour. Tiles are a pre-rendered pyramid of the slide
(longest side at most {max_size} px), read through TIAToolbox.</p>
</section>"""

CSS = """body{font-family:system-ui,sans-serif;margin:0 2em 3em;max-width:1300px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;
padding:2px 8px;text-align:right}td:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:8px}.figs img{width:380px}
#viewer{width:100%;height:560px;background:#222;border:1px solid #888}
.controls label{margin-right:1.5em}.note{color:#555;font-size:90%}
#colour-bar{height:14px;width:320px;margin-top:6px;border:1px solid #888}
.bar-ends{width:320px;display:flex;justify-content:space-between;font-size:80%}
canvas.overlay{image-rendering:pixelated;pointer-events:none}
svg.outlines{overflow:visible;pointer-events:none}
svg.outlines polygon{fill:none;stroke:#000;stroke-width:2;vector-effect:non-scaling-stroke}
.strip{display:flex;flex-wrap:wrap;gap:4px}.patch{margin:0;width:100px;font-size:70%}
.patch img{width:96px;height:96px;display:block}
.patch.missing{height:96px;background:#eee}
summary{cursor:pointer;font-weight:600;margin:.4em 0}"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        f"<link rel='stylesheet' href='{FILES}/report.css'></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}"
        f"<script src='{FILES}/openseadragon/openseadragon.min.js'></script>"
        f"<script src='{FILES}/data.js'></script>"
        f"<script src='{FILES}/report.js'></script></body></html>"
    )


def _copy_assets(files: Path) -> None:
    files.mkdir(parents=True, exist_ok=True)
    dest = files / "openseadragon"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ASSETS / "openseadragon", dest)
    shutil.copy2(ASSETS / "report.js", files / "report.js")
    (files / "report.css").write_text(CSS, encoding="utf-8")


def _lut(cmap: str = "jet") -> list[list[int]]:
    from matplotlib import colormaps

    rgba = colormaps[cmap](np.linspace(0, 1, 256))
    return (rgba[:, :3] * 255).round().astype(int).tolist()


def write_html_report(folder: str | Path, options: ReportOptions | None = None) -> Path:
    """Write ``folder/report.html`` (a run or a ``tiahnm predict`` output).

    Args:
        folder (str | Path): The run folder (``summary.json``) or predict output
            (``predict_summary.json``).
        options (ReportOptions | None): Gallery size, viewer size, slide limit.

    Returns:
        Path: ``report.html``.

    Raises:
        DataError: ``folder`` is neither a finished run nor a predict output.
    """
    from tiahnm.evaluation.reference import class_names_from_config, find_run_config

    out = Path(folder)
    is_run = (out / "summary.json").is_file()
    if not is_run and not (out / "predict_summary.json").is_file():
        msg = f"{out}: neither a finished run (summary.json) nor a predict output."
        raise DataError(msg)
    cfg = find_run_config(out)
    t0 = time.perf_counter()
    ctx = _Context(
        out=out,
        files=out / FILES,
        class_names=class_names_from_config(cfg),
        annotations=(cfg.get("extract") or {}).get("annotations"),
        options=options or ReportOptions(),
    )
    for stale in (ctx.files / "slides", out / "galleries"):
        if stale.exists():
            shutil.rmtree(stale)
    _copy_assets(ctx.files)
    collected = _collect_slides(out)
    if ctx.options.slides >= 0:
        collected = collected[: ctx.options.slides]
    slides = [_slide_entry(ctx, s, a) for s, a in collected]
    body = []
    if is_run:
        from tiahnm.evaluation.report import load_run

        summary, results = load_run(out)
        title = f"Run report: {summary.get('head')} + miner {summary.get('miner')}"
        body.append(_metrics_html(ctx, summary, results))
    else:
        title, summary = f"Predictions: {out.name}", {}
    if slides:
        body.append(VIEWER_HTML.replace("{max_size}", str(ctx.options.max_size)))
        body.append(_galleries_html(ctx, slides))
    else:
        body.append(
            "<p class='note'>No instance scores with coordinates: no viewer.</p>"
        )
    if is_run:
        t1 = time.perf_counter()
        body.append(_mined_html(ctx, _mined_sections(ctx), summary.get("miner")))
        ctx.timings["mined"] = time.perf_counter() - t1
    data = {
        "slides": [{k: v for k, v in s.items() if k != "gallery"} for s in slides],
        "lut": _lut(),
    }
    with atomic_open(ctx.files / "data.js", "w", encoding="utf-8") as fh:
        fh.write("window.TIAHNM_REPORT = " + json.dumps(data) + ";\n")
    path = out / "report.html"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(_page(title, "".join(body)))
    ctx.timings["total"] = time.perf_counter() - t0
    timings = {k: round(v, 3) for k, v in ctx.timings.items()}
    (ctx.files / "timings.json").write_text(json.dumps(timings), encoding="utf-8")
    logger.info("report.html in %.2f s (%s)", ctx.timings["total"], ctx.timings)
    return path


def write_html_report_safely(
    folder: str | Path, options: ReportOptions | None = None
) -> Path | None:
    """:func:`write_html_report`, warning instead of failing (results are saved)."""
    try:
        return write_html_report(folder, options)
    except Exception as exc:
        msg = f"could not write report.html ({type(exc).__name__}: {exc})."
        logger.debug("html report failed", exc_info=True)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return None


__all__ = ["ReportOptions", "write_html_report", "write_html_report_safely"]
