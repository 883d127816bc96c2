"""``tiahnm predict``, ``tiahnm heatmap`` and ``tiahnm report``.

Only click is imported here; torch, matplotlib and TIAToolbox are imported when a
command runs. ``predict`` takes the encoder and tiling options of ``tiahnm extract``
(the same option objects), since a checkpoint holds only the head.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import click

from tiahnm.cli import CONTEXT_SETTINGS, EXIT_PARTIAL, _guard
from tiahnm.cli.extract import _parse_options, _setup_logging, extract
from tiahnm.errors import DataError

#: Options of ``tiahnm extract`` that ``tiahnm predict`` takes too.
EXTRACT_OPTIONS = (
    "resolution",
    "units",
    "patch_size",
    "stride",
    "encoder",
    "weights",
    "encoder_options",
    "batch_size",
    "num_workers",
    "device",
    "amp",
    "cpu_precision",
    "masker",
    "min_tissue",
    "mask_mpp",
    "masker_options",
    "mpp",
    "power",
    "file_types",
    "seed",
    "verbose",
)


def _extract_config(values: dict[str, Any]) -> Any:
    """An :class:`~tiahnm.slides.extract.ExtractConfig` from extract's option values."""
    from tiahnm.slides.extract import ExtractConfig
    from tiahnm.slides.reader import SLIDE_SUFFIXES
    from tiahnm.slides.tiling import TilingConfig

    suffixes = tuple(sorted(SLIDE_SUFFIXES))
    if values["file_types"]:
        suffixes = tuple(
            "." + s.strip().lstrip("*").lstrip(".").lower()
            for s in values["file_types"].split(",")
            if s.strip()
        )
    return ExtractConfig(
        tiling=TilingConfig(
            resolution=values["resolution"],
            units=values["units"],
            patch_size=values["patch_size"],
            stride=values["stride"],
            masker=values["masker"],
            min_tissue=values["min_tissue"],
            mask_mpp=values["mask_mpp"],
            masker_options=_parse_options(values["masker_options"], "--masker-option"),
        ),
        encoder=values["encoder"],
        weights=values["weights"],
        encoder_options=_parse_options(values["encoder_options"], "--encoder-option"),
        batch_size=values["batch_size"],
        num_workers=values["num_workers"],
        device=values["device"],
        amp=values["amp"],
        cpu_precision=values["cpu_precision"],
        mpp=values["mpp"],
        power=values["power"],
        seed=0 if values["seed"] is None else values["seed"],
        suffixes=suffixes,
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("slides", nargs=-1, required=True, type=click.Path(exists=False))
@click.option(
    "--output-path",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: predictions.csv, instance_scores.h5, failures.csv.",
)
@click.option(
    "--features-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where features of slide images are written and reused "
    "[OUTPUT_PATH/features].",
)
@_guard
def predict(
    checkpoint: str,
    slides: tuple[str, ...],
    output_path: str,
    features_dir: str | None,
    **values: Any,
) -> None:
    """Predict SLIDES (slide images, .h5 feature files, or folders) with CHECKPOINT.

    CHECKPOINT is a fold's best.pt, or a training run folder: then every fold's
    best.pt is used and their probabilities averaged (an ensemble, thresholded at the
    mean of the validation-chosen fold thresholds). Slide images are encoded first
    with the encoder options below, which must match those of the training features.
    Writes predictions.csv (slide_id, probability, prediction, n_patches; with
    more than 2 classes also p_<k>; survival runs: slide_id, risk, high_risk,
    n_patches),
    instance_scores.h5 (for `tiahnm heatmap`) and failures.csv; a slide that fails
    is skipped and the exit code is 3.
    """
    _setup_logging(verbose=values["verbose"])
    from tiahnm.evaluation.predict import predict_slides

    def report(slide: str, status: str, message: str) -> None:
        if status == "failed":
            click.echo(f"FAILED  {slide}: {message}", err=True)
        else:
            click.echo(f"done    {slide}: {message}")

    from tiahnm.utils.lock import folder_lock

    with folder_lock(output_path):  # one writer per output folder
        summary = predict_slides(
            checkpoint,
            slides,
            output_path,
            extract_cfg=_extract_config(values),
            features_dir=features_dir,
            device=values["device"],
            on_result=report,
        )
    n_heads = len(summary.checkpoints)
    click.echo(
        f"\n{len(summary.predictions)} slides predicted, {len(summary.failures)} "
        f"failed ({'ensemble of ' + str(n_heads) + ' heads' if n_heads > 1 else '1 head'}"
        f", threshold {summary.threshold:.3f}) in {summary.seconds:.1f} s."
    )
    click.echo(f"Predictions: {summary.output_dir / 'predictions.csv'}")
    if summary.predictions:
        from tiahnm.evaluation.html_report import write_html_report_safely

        page = write_html_report_safely(summary.output_dir)
        if page is not None:
            click.echo(
                f"Report (galleries in {summary.output_dir / 'galleries'}): {page}"
            )
    if summary.failures:
        click.echo(
            f"{len(summary.failures)} failed: see {summary.output_dir / 'failures.csv'}",
            err=True,
        )
        if not summary.predictions:
            msg = "every slide failed."
            raise DataError(msg)
        sys.exit(EXIT_PARTIAL)


_by_name = {p.name: p for p in extract.params}
predict.params.extend(copy.copy(_by_name[name]) for name in EXTRACT_OPTIONS)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("scores", type=click.Path(exists=True))
@click.option(
    "--output-path",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder of <slide_id>.png (and _overlay.png, .geojson, .db).",
)
@click.option(
    "--slides",
    "slide_inputs",
    multiple=True,
    type=click.Path(exists=True),
    help="Slide files or folders, matched by slide id (default: the slide path "
    "stored with the features). Repeatable.",
)
@click.option(
    "--slide-id",
    "slide_ids",
    multiple=True,
    help="Only these slides (repeatable).",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Patches below it on the 0-1 colour scale are transparent [fixed scale: "
    "the stored instance threshold; other scales: 0.5].",
)
@click.option(
    "--max-size",
    type=int,
    default=1024,
    show_default=True,
    help="Longest thumbnail side in pixels.",
)
@click.option("--alpha", type=float, default=0.5, show_default=True)
@click.option("--cmap", default="jet", show_default=True, help="Matplotlib colour map.")
@click.option(
    "--scale",
    type=click.Choice(["auto", "validation", "fixed", "minmax", "percentile"]),
    default="auto",
    show_default=True,
    help="Colour scale: validation (relative to the run's validation patch scores: "
    "painted above every patch of the negative validation slides), "
    "fixed (raw 0-1 probabilities), minmax (the slide's range), percentile (rank "
    "within the slide, as CLAM), auto (validation when the scores carry the "
    "reference, else fixed for probabilities, else minmax).",
)
@click.option(
    "--annotations",
    type=click.Path(exists=True),
    default=None,
    help="GeoJSON / ASAP XML annotations (file or folder, matched by slide id) to "
    "outline [the run's extract.annotations].",
)
@click.option("--limit", type=int, default=None, help="At most this many slides.")
@click.option(
    "--class",
    "class_index",
    type=click.IntRange(min=0),
    default=None,
    help="Draw the instance probability of this class (multi-class runs whose head "
    "gives per-class instance scores) instead of the default score.",
)
@click.option(
    "--geojson", is_flag=True, help="Also write <slide_id>.geojson (level-0 polygons)."
)
@click.option(
    "--store",
    is_flag=True,
    help="Also write <slide_id>.db, a TIAToolbox SQLiteStore for its viewer.",
)
@click.option("--verbose", is_flag=True, help="Show TIAToolbox's log messages too.")
@_guard
def heatmap(
    scores: str,
    output_path: str,
    slide_inputs: tuple[str, ...],
    slide_ids: tuple[str, ...],
    threshold: float | None,
    max_size: int,
    alpha: float,
    cmap: str,
    scale: str,
    limit: int | None,
    annotations: str | None,
    class_index: int | None,
    geojson: bool,  # noqa: FBT001 - click flag
    store: bool,  # noqa: FBT001 - click flag
    verbose: bool,  # noqa: FBT001 - click flag
) -> None:
    """Draw heatmaps of stored instance SCORES over slide thumbnails.

    SCORES is an instance_scores.h5, a fold folder, a `tiahnm predict` output folder
    or a training run folder (every fold; a slide tested in several repeats is drawn
    once, from the first). No encoder is run. A slide that fails is reported and the
    others go on (exit code 3).
    """
    _setup_logging(verbose=verbose)
    from tiahnm.evaluation.heatmap import outline_rings, render_heatmap
    from tiahnm.evaluation.reference import (
        class_names_from_config,
        find_run_config,
        parse_reference,
    )
    from tiahnm.evaluation.scores import find_score_files, read_instance_scores
    from tiahnm.slides.reader import find_slides, slide_id

    if not 0.0 <= alpha <= 1.0:
        raise click.BadParameter("must be within [0, 1].", param_hint="--alpha")
    run_cfg = find_run_config(scores)
    class_names = class_names_from_config(run_cfg)
    annotations = annotations or (run_cfg.get("extract") or {}).get("annotations")
    slide_files = {slide_id(p): p for p in find_slides(slide_inputs)}
    wanted = set(slide_ids)
    done: set[str] = set()
    failed = 0
    for path in find_score_files(scores):
        slides, attrs = read_instance_scores(path)
        stored = attrs.get("instance_threshold")
        stored = 0.5 if stored in (None, "") else float(stored)
        for s in slides:
            if s.slide_id in done or (wanted and s.slide_id not in wanted):
                continue
            if limit is not None and len(done) >= limit:
                break
            done.add(s.slide_id)
            try:
                s = _class_view(s, class_index)
                res = render_heatmap(
                    s,
                    output_path,
                    slide_path=slide_files.get(s.slide_id),
                    kind=attrs.get("score_kind"),
                    threshold=threshold,
                    fixed_threshold=stored,
                    max_size=max_size,
                    cmap=cmap,
                    alpha=alpha,
                    scale=scale,
                    geojson=geojson,
                    store=store,
                    class_names=class_names,
                    outlines=outline_rings(annotations, s.slide_id),
                    reference=parse_reference(attrs.get("val_reference")),
                )
            except Exception as exc:  # one bad slide must not stop the others
                failed += 1
                click.echo(f"FAILED  {s.slide_id}: {exc}", err=True)
                continue
            extra = (
                " (no slide image: white background)"
                if res.background != "slide"
                else ""
            )
            click.echo(f"done    {s.slide_id}: {res.png}{extra}")
    if missing := wanted - done:
        click.echo(f"not found in {scores}: {', '.join(sorted(missing))}", err=True)
    click.echo(f"\n{len(done) - failed} heatmaps in {output_path}, {failed} failed.")
    if failed or missing:
        if failed == len(done):
            msg = "no heatmap was drawn."
            raise DataError(msg)
        sys.exit(EXIT_PARTIAL)


def _class_view(slide: Any, class_index: int | None) -> Any:
    """``slide`` with the scores of class ``class_index`` (unchanged for None)."""
    from dataclasses import replace

    if class_index is None:
        return slide
    cs = slide.class_scores
    if cs is None or class_index >= cs.shape[1]:
        have = "none" if cs is None else f"classes 0..{cs.shape[1] - 1}"
        msg = f"no per-class instance scores for class {class_index} ({have})."
        raise DataError(msg)
    return replace(slide, scores=cs[:, class_index])


@click.command(name="evaluate", context_settings=CONTEXT_SETTINGS)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--labels",
    "labels_csv",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Labels CSV of the cohort (as the run's: slide_id, label or time/event, "
    "optional patient_id).",
)
@click.option(
    "--features-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="The cohort's <slide_id>.h5 feature files (`tiahnm extract` with the "
    "run's encoder).",
)
@click.option(
    "--output-path",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: summary.json, report.md, predictions.csv, instance_scores.h5.",
)
@click.option("--device", default="auto", show_default=True, help="Device.")
@click.option(
    "--bootstrap",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Bootstrap resamples of the 95% CIs (0: none).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@_guard
def evaluate(
    run_dir: str,
    labels_csv: str,
    features_dir: str,
    output_path: str,
    device: str,
    bootstrap: int,
    seed: int,
) -> None:
    """Score the trained RUN_DIR (its fold ensemble) on a labelled external cohort.

    Metrics of the run's task (AUC ..., macro AUC and kappa, or c-index) with
    bootstrap 95% CIs, per slide and, when the labels CSV has patients, per patient;
    thresholds are the run's validation-chosen ones. Writes summary.json, report.md,
    predictions.csv and instance_scores.h5 in OUTPUT_PATH.
    """
    from tiahnm.evaluation.external import evaluate_cohort

    summary = evaluate_cohort(
        run_dir,
        labels_csv,
        features_dir,
        output_path,
        device=device,
        n_resamples=bootstrap,
        seed=seed,
    )
    for level in ("metrics", "patient_metrics"):
        for name, m in summary.get(level, {}).items():
            value = "-" if m.get("value") is None else f"{m['value']:.3f}"
            ci = m.get("ci95")
            ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""
            where = "patient" if level == "patient_metrics" else "slide"
            click.echo(f"{where:8s} {name:20s} {value}{ci_text}")
    click.echo(f"Report: {output_path}/report.md")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_guard
def report(run_dir: str) -> None:
    """Write RUN_DIR/report.md and RUN_DIR/report.html again.

    report.html (an offline folder: metrics, curves, a zoomable slide viewer with the
    heatmap overlay, top/bottom and mined patch galleries) is also written for a
    `tiahnm predict` output folder given as RUN_DIR.
    """
    from tiahnm.evaluation.html_report import write_html_report
    from tiahnm.evaluation.report import load_run, write_report
    from tiahnm.tasks import task_from_spec

    if (
        not (Path(run_dir) / "summary.json").is_file()
        and (Path(run_dir) / "predict_summary.json").is_file()
    ):
        click.echo(f"HTML report: {write_html_report(run_dir)}")
        return

    summary, results = load_run(run_dir)
    path = write_report(
        run_dir, summary, results, task_from_spec(summary.get("task_spec"))
    )
    click.echo(f"Report: {path}")
    click.echo(f"HTML report: {write_html_report(run_dir)}")
