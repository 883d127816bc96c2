"""``tiahnm extract``: slides to per-slide feature files (TIAToolbox-style options).

Only click is imported here; torch and TIAToolbox are imported when the command runs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from tiahnm.cli import CONTEXT_SETTINGS, EXIT_PARTIAL, _guard
from tiahnm.cli.options import cli_seed

_LOG_MARK = "_tiahnm_extract_handler"


def _parse_options(items: tuple[str, ...], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings (YAML values) to a dict."""
    import yaml

    from tiahnm.utils.safe_yaml import safe_load

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"{flag} expects KEY=VALUE, got {item!r}.")
        try:
            out[key.strip()] = safe_load(value)
        except (yaml.YAMLError, ValueError) as exc:
            raise click.UsageError(f"{flag} {item!r}: bad value ({exc}).") from None
    return out


class _QuietTiatoolbox(logging.Filter):
    """Drop TIAToolbox's root-logger chatter below ERROR unless verbose."""

    def __init__(self, *, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("tiahnm"):
            return record.levelno >= (logging.DEBUG if self.verbose else logging.INFO)
        return self.verbose or record.levelno >= logging.ERROR


def _setup_logging(*, verbose: bool) -> None:
    """One stderr handler on the root logger (TIAToolbox then adds none of its own)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, _LOG_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(_QuietTiatoolbox(verbose=verbose))
    setattr(handler, _LOG_MARK, True)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger("tiahnm").setLevel(logging.DEBUG if verbose else logging.INFO)


def _suffixes(file_types: str | None) -> tuple[str, ...]:
    """``--file-types`` as lower-case suffixes (default: every slide format read)."""
    from tiahnm.slides.reader import SLIDE_SUFFIXES

    if not file_types:
        return tuple(sorted(SLIDE_SUFFIXES))
    return tuple(
        "." + s.strip().lstrip("*").lstrip(".").lower()
        for s in file_types.split(",")
        if s.strip()
    )


def _echo_result(result: Any) -> None:
    """One line per slide as it finishes."""
    if result.status == "failed":
        click.echo(f"FAILED  {result.slide}: {result.error}", err=True)
    elif result.status == "skipped":
        click.echo(f"skipped {result.slide} (done, {result.n_patches} patches)")
    else:
        click.echo(
            f"done    {result.slide}: {result.n_patches} patches in "
            f"{result.seconds:.1f} s"
        )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("slides", nargs=-1, type=click.Path(exists=False))
@click.option(
    "--img-input",
    "img_input",
    multiple=True,
    type=click.Path(exists=False),
    help="Slide file or folder (repeatable; same as the SLIDES arguments).",
)
@click.option(
    "--output-path",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder of <slide_id>.h5 files (created).",
)
@click.option(
    "--resolution",
    type=float,
    default=0.5,
    show_default=True,
    help="Target resolution of the patches, in --units.",
)
@click.option(
    "--units",
    type=click.Choice(["mpp", "power", "baseline"]),
    default="mpp",
    show_default=True,
    help="Units of --resolution (TIAToolbox names).",
)
@click.option("--patch-size", type=int, default=224, show_default=True)
@click.option(
    "--stride", type=int, default=None, help="Step between patches [patch size]."
)
@click.option(
    "--encoder",
    default="small_cnn",
    show_default=True,
    help="Encoder NAME[:MODEL]: small_cnn, torchvision:resnet50, "
    "timm:vit_small_patch16_224, module:pkg.mod:Class (see `tiahnm plugins`).",
)
@click.option(
    "--weights",
    default=None,
    help="Local weights file (state dict; never downloaded), or 'random-init'.",
)
@click.option(
    "--encoder-option",
    "encoder_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Encoder factory option (YAML value), e.g. input_size=224. Repeatable.",
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--num-workers",
    "--num-loader-workers",
    "num_workers",
    type=int,
    default=None,
    help="DataLoader worker processes that read patches (0: a read-ahead thread) "
    "[0 on CPU, min(8, cpus - 1) on GPU].",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when present), cpu, cuda, cuda:N.",
)
@click.option(
    "--amp",
    type=click.Choice(["auto", "bf16", "fp16", "off"]),
    default="auto",
    show_default=True,
    help="Autocast on GPU (auto: bf16 if supported, else fp16). CPU: --cpu-precision.",
)
@click.option(
    "--cpu-precision",
    type=click.Choice(["fp32", "bf16", "auto"]),
    default="fp32",
    show_default=True,
    help="Encoder precision on CPU: bf16 autocast needs AMX / AVX-512 bf16 (else an "
    "error); auto takes bf16 when supported and a probe batch agrees with fp32 to "
    "cosine 0.999.",
)
@click.option(
    "--masker",
    type=click.Choice(["otsu", "morphological", "none"]),
    default="otsu",
    show_default=True,
    help="TIAToolbox tissue masker.",
)
@click.option(
    "--min-tissue",
    type=float,
    default=0.5,
    show_default=True,
    help="Minimum tissue fraction of a kept patch.",
)
@click.option(
    "--mask-mpp",
    type=float,
    default=None,
    help="Mask resolution in microns/px [8, or finer for small patches].",
)
@click.option(
    "--masker-option",
    "masker_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="TIAToolbox masker option, e.g. kernel_size=5 (morphological). Repeatable.",
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="Level-0 microns per pixel for slides/images WITHOUT resolution metadata "
    "(files that have it keep theirs).",
)
@click.option(
    "--power",
    type=float,
    default=None,
    help="Objective power for slides without it (with --units power).",
)
@click.option(
    "--annotations",
    type=click.Path(exists=True),
    default=None,
    help="Folder of <slide_id>.geojson/.xml/.png (or one such file): adds "
    "patch-level instance_labels (evaluation only).",
)
@click.option(
    "--min-overlap",
    type=float,
    default=0.5,
    show_default=True,
    help="Annotated fraction of a patch for a positive instance label.",
)
@click.option(
    "--annotation-class",
    "annotation_classes",
    multiple=True,
    help="Only these annotation classes/groups are positive (repeatable; default all).",
)
@click.option(
    "--file-types",
    default=None,
    help="Suffixes taken from folders, e.g. '*.svs, *.ndpi' [all known slide types].",
)
@click.option("--overwrite", is_flag=True, help="Recompute slides already done.")
@cli_seed()
@click.option("--verbose", is_flag=True, help="Show TIAToolbox's log messages too.")
@_guard
def extract(
    slides: tuple[str, ...],
    img_input: tuple[str, ...],
    output_path: str,
    resolution: float,
    units: str,
    patch_size: int,
    stride: int | None,
    encoder: str,
    weights: str | None,
    encoder_options: tuple[str, ...],
    batch_size: int,
    num_workers: int | None,
    device: str,
    amp: str,
    cpu_precision: str,
    masker: str,
    min_tissue: float,
    mask_mpp: float | None,
    masker_options: tuple[str, ...],
    mpp: float | None,
    power: float | None,
    annotations: str | None,
    min_overlap: float,
    annotation_classes: tuple[str, ...],
    file_types: str | None,
    overwrite: bool,  # noqa: FBT001 - click flag
    seed: int | None,
    verbose: bool,  # noqa: FBT001 - click flag
) -> None:
    """Encode the patches of SLIDES (files or folders) into OUTPUT_PATH/<slide_id>.h5.

    Each file holds `features` [N, D] float32 and `coords` [N, 2] (top-left corners in
    level-0 pixels), with the settings as attributes. Slides already done with the
    same settings are skipped; a slide that fails is listed in failures.csv and the
    others go on (exit code 3 when any failed).
    """
    inputs = [*slides, *img_input]
    if not inputs:
        raise click.UsageError("give SLIDES (files or folders) or --img-input.")
    _setup_logging(verbose=verbose)
    from tiahnm.slides.extract import ExtractConfig, extract_features
    from tiahnm.slides.tiling import TilingConfig

    cfg = ExtractConfig(
        tiling=TilingConfig(
            resolution=resolution,
            units=units,
            patch_size=patch_size,
            stride=stride,
            masker=masker,
            min_tissue=min_tissue,
            mask_mpp=mask_mpp,
            masker_options=_parse_options(masker_options, "--masker-option"),
        ),
        encoder=encoder,
        weights=weights,
        encoder_options=_parse_options(encoder_options, "--encoder-option"),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        amp=amp,
        cpu_precision=cpu_precision,
        mpp=mpp,
        power=power,
        seed=0 if seed is None else seed,
        annotations=annotations,
        min_overlap=min_overlap,
        annotation_classes=annotation_classes,
        overwrite=overwrite,
        suffixes=_suffixes(file_types),
    )
    summary = extract_features(inputs, output_path, cfg, on_result=_echo_result)
    info = summary.as_dict()
    rate = info["patches_per_second"]
    click.echo(
        f"\n{info['n_slides']} slides: {info['done']} done, {info['skipped']} "
        f"skipped, {info['failed']} failed; {info['patches_encoded']} patches in "
        f"{info['seconds']:.1f} s (start-up {info['startup_s']:.1f} s"
        + (f", {rate:.1f} patches/s while encoding)" if rate else ")")
    )
    click.echo(f"Features: {summary.output_dir}")
    if summary.failed:
        click.echo(
            f"{len(summary.failed)} failed: see {summary.output_dir}/failures.csv",
            err=True,
        )
        sys.exit(EXIT_PARTIAL)
