"""The run configuration: one YAML file, validated on load.

The schema is a tree of dataclasses; every field has a type, a default and a comment
(``metadata["doc"]``), from which :func:`template` writes the commented file of
``tiahnm init`` and ``docs/configuration.md`` is generated. Unknown keys and values of
the wrong type raise :class:`~tiahnm.errors.ConfigError` naming the dotted key.
Component options (``head.options`` ...) are checked against the plugin's factory when
the component is built.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tiahnm.errors import ConfigError
from tiahnm.utils.options import coerce, type_name


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(
            default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw
        )
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class ComponentConfig:
    """A plugin by name plus its keyword options."""

    name: str = _f("none", "Registered plugin name (see `tiahnm plugins`).")
    options: dict[str, Any] = _f({}, "Keyword options passed to the plugin's factory.")


@dataclass
class HeadConfig(ComponentConfig):
    """The MIL head."""

    name: str = _f(
        "abmil", "MIL head: abmil, abmil_gated, dsmil, transmil, clam_sb, ..."
    )


@dataclass
class LossConfig(ComponentConfig):
    """An extra loss added to the head's own loss."""

    name: str = _f("mirank", "Loss plugin name.")
    weight: float = _f(1.0, "Multiplier of this loss.")


@dataclass
class CallbackConfig(ComponentConfig):
    """A callback (logger) fed the run's events."""

    name: str = _f("csv_log", "Callback plugin: csv_log, tensorboard, mlflow, ...")


@dataclass
class SweepConfig:
    """``tiahnm sweep``: trials over config keys (``tiahnm run`` ignores it)."""

    method: Literal["grid", "optuna"] = _f(
        "grid", "grid: every combination of the values; optuna: Optuna's TPE search."
    )
    metric: str = _f(
        "val_auc",
        "Ranking metric: val_<name> (mean over folds of the validation bags' metric "
        "at the selected epoch; test metrics never rank).",
    )
    direction: Literal["maximize", "minimize"] = _f("maximize", "Better is larger?")
    n_trials: int | None = _f(None, "Trials of an optuna search (grid: all points).")
    params: dict[str, Any] = _f(
        {},
        "Dotted config key -> list of values (grid or optuna), or {low, high, log, "
        "step} (optuna), e.g. {miner.options.mask_ratio_h: [0.01, 0.03]}.",
    )
    study_name: str = _f("tiahnm-sweep", "Optuna study name in the storage.")


@dataclass
class DataConfig:
    """Where the bags come from."""

    source: str = _f("h5_folder", "Bag source plugin: h5_folder, mil_csv, ...")
    options: dict[str, Any] = _f(
        {},
        "Options of the bag source, e.g. {features_dir: feats/, labels_csv: labels.csv} "
        "for h5_folder or {path: musk1.csv} for mil_csv.",
    )
    standardize: bool = _f(
        False, "Standardise features with the mean/std of each fold's training bags."
    )
    bag_level: Literal["slide", "patient"] = _f(
        "slide",
        "slide: one bag per slide (metrics also per patient when the labels CSV has a "
        "patient column); patient: one bag per patient, its slides' instances "
        "concatenated.",
    )


@dataclass
class TaskConfig(ComponentConfig):
    """What a label is: the loss, metrics, monitor and threshold."""

    name: str = _f(
        "auto",
        "Task: auto (binary for 2 classes, else multiclass), binary, multiclass, "
        "survival, regression (see `tiahnm plugins`).",
    )


@dataclass
class ExtractStageConfig:
    """The ``extract`` stage of ``tiahnm run``: slides to feature files."""

    slides: list[str] = _f(
        [], "Slide files and/or folders; empty means no extract stage."
    )
    features_dir: str | None = _f(
        None, "Where the <slide_id>.h5 files go (default: <output_dir>/features)."
    )
    encoder: str = _f(
        "small_cnn", "Encoder: small_cnn, torchvision:NAME, timm:NAME ..."
    )
    weights: str | None = _f(None, "Local weights file, or random-init.")
    encoder_options: dict[str, Any] = _f({}, "Other encoder options.")
    resolution: float = _f(0.5, "Read resolution, in `units` (TIAToolbox naming).")
    units: Literal["mpp", "power", "level", "baseline"] = _f("mpp", "Resolution units.")
    patch_size: int = _f(224, "Patch size in pixels at the read resolution.")
    stride: int | None = _f(None, "Stride (default: patch_size, no overlap).")
    masker: str = _f("otsu", "Tissue masker: otsu, morphological or none.")
    min_tissue: float = _f(0.5, "Minimum tissue fraction of a kept patch.")
    batch_size: int = _f(64, "Patches per forward pass.")
    cpu_precision: Literal["fp32", "bf16", "auto"] = _f(
        "fp32",
        "Encoder precision on CPU: fp32, bf16 (needs AMX / AVX-512 bf16, else an "
        "error) or auto (bf16 when supported and a probe batch agrees to cosine 0.999).",
    )
    num_workers: int | None = _f(None, "Patch-reading workers (default: auto).")
    mpp: float | None = _f(None, "Level-0 mpp for slides without resolution metadata.")
    power: float | None = _f(None, "Objective power for slides without metadata.")
    annotations: str | None = _f(
        None, "Annotation file or folder (GeoJSON, ASAP XML, masks) for patch labels."
    )


@dataclass
class TrainConfig:
    """The shared training loop."""

    epochs: int = _f(100, "Maximum epochs per round.")
    rounds: int = _f(
        1, "Training rounds (miners such as li2019 add bags between rounds)."
    )
    optimizer: Literal["adam", "adamw", "sgd"] = _f("adam", "Optimiser.")
    lr: float = _f(2e-4, "Learning rate.")
    weight_decay: float = _f(1e-5, "Weight decay.")
    momentum: float = _f(0.9, "SGD momentum (sgd only).")
    scheduler: Literal["none", "cosine", "step"] = _f(
        "cosine", "Learning-rate schedule."
    )
    step_size: int = _f(50, "Epochs between decays (step scheduler).")
    gamma: float = _f(0.5, "Decay factor (step scheduler).")
    grad_clip: float | None = _f(None, "Clip the gradient norm to this value.")
    warmup_epochs: int = _f(
        0,
        "Linear learning-rate warm-up over this many epochs (from lr / 10) before "
        "the schedule starts (the cosine schedule spans the remaining epochs).",
    )
    monitor: Literal["val_loss", "val_auc", "val_acc", "val_c_index"] = _f(
        "val_loss",
        "Validation metric for early stopping and model selection (val_auc: macro "
        "one-vs-rest AUC when C > 2; val_c_index: survival).",
    )
    patience: int = _f(20, "Stop after this many epochs without improvement.")
    min_epochs: int = _f(0, "Never stop before this epoch.")
    amp: Literal["auto", "off", "bf16", "fp16"] = _f(
        "auto",
        "Mixed precision on GPU (auto: bf16 when supported); CPU: cpu_precision.",
    )
    cpu_precision: Literal["fp32", "bf16", "auto"] = _f(
        "fp32",
        "On CPU: fp32, bf16 autocast (needs AMX / AVX-512 bf16, else an error) or auto "
        "(bf16 when supported and a probe bag agrees with fp32 to cosine 0.999).",
    )
    device: str = _f(
        "auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:1 ..."
    )
    num_threads: int | None = _f(
        None, "CPU threads for torch (default: torch's choice)."
    )
    checkpoint_every: int = _f(1, "Save a resumable checkpoint every N epochs.")
    nonfinite: Literal["stop", "skip"] = _f(
        "stop",
        "On a NaN/inf training loss: stop the fold with an error (the last good "
        "checkpoint is kept), or skip that optimiser step and count it.",
    )
    progress: bool = _f(True, "Show progress bars.")
    batch_size: int = _f(
        1,
        "Bags (miner batches) per optimiser step, over all processes; the step loss is "
        "their mean. Under torchrun each process takes batch_size / world_size of them.",
    )
    pad_batches: bool = _f(
        False,
        "Forward the bags of a step as one padded [B, N_max, D] tensor with a mask "
        "(heads with batched support: abmil, abmil_gated, mean_pool, max_pool; plain "
        "training without extra losses); otherwise one bag per forward.",
    )
    compile: bool = _f(
        False,
        "torch.compile the head with dynamic shapes (bag sizes vary without "
        "recompiling); meant for GPU.",
    )
    prefetch: int = _f(
        2,
        "Bags read ahead by background threads (streamed features, and pinning on "
        "CUDA); 0 reads each bag when needed.",
    )
    loader_workers: int = _f(1, "Background threads reading bags ahead.")
    pin_memory: bool = _f(
        True,
        "On CUDA, keep training features in pinned memory when they take less than "
        "half the free RAM (asynchronous copies).",
    )


@dataclass
class CVConfig:
    """Cross-validation and the validation split."""

    folds: int = _f(5, "Stratified folds (ignored when the data fixes the split).")
    repeats: int = _f(1, "Repeats of the k-fold CV with different shuffles.")
    val_fraction: float = _f(
        0.1, "Fraction of each training part held out (stratified) for validation."
    )
    split_file: str | None = _f(
        None,
        "CSV slide_id,repeat,fold,split assigning bags to folds; overrides folds/repeats.",
    )
    refit: bool = _f(
        False,
        "After choosing the epoch on validation, retrain on training + validation bags "
        "for that many epochs (same seed) and evaluate that model; the threshold still "
        "comes from the validation predictions of the first model. Not with "
        "train.rounds > 1 (a config error).",
    )
    use_source_split: bool = _f(
        True, "Use the train/val/test split column of the data when it has one."
    )


@dataclass
class EvalConfig:
    """Evaluation."""

    threshold: Literal["0.5", "youden"] = _f(
        "0.5", "Decision threshold: 0.5, or Youden's J chosen on the validation split."
    )
    instance_threshold: Literal["0.5", "youden"] = _f(
        "0.5",
        "Instance (patch) threshold for instance F1: 0.5, or Youden's J of the "
        "validation bags' instance scores against their instance labels.",
    )
    instance_score: str | None = _f(
        None,
        "Instance score stored in instance_scores.h5 and evaluated (instance AUC/AP/F1): "
        "attention, instance_prob, class_aware or instance_logit, as the head offers; "
        "default: the head's own (instance_prob for the built-in heads).",
    )
    bootstrap: int = _f(
        1000,
        "Bootstrap resamples of the 95% CI of the pooled test metrics (0: no CI).",
    )
    report: bool = _f(
        True, "Write report.md with ROC and confusion-matrix plots after training."
    )
    heatmaps: int = _f(
        0,
        "After training, draw heatmaps of this many test slides (those with instance "
        "scores and coordinates) in <output_dir>/heatmaps, linked in report.md "
        "(0: none, -1: all).",
    )


@dataclass
class Config:
    """A tiahnm run."""

    output_dir: str = _f("runs/tiahnm", "Where results, checkpoints and the config go.")
    seed: int = _f(0, "Seed of every random choice (splits, init, shuffling, masking).")
    extract: ExtractStageConfig = _f(None, "Slides to features (optional stage).")
    data: DataConfig = _f(
        None,
        "Input bags.",
    )
    task: TaskConfig = _f(None, "The task (label semantics, loss, metrics).")
    head: HeadConfig = _f(None, "The MIL head.")
    miner: ComponentConfig = _f(
        None, "The hard-instance miner (none = plain training)."
    )
    losses: list[LossConfig] = _f(
        [], "Extra losses, e.g. [{name: mirank, weight: 0.1}]."
    )
    train: TrainConfig = _f(None, "Training loop.")
    callbacks: list[CallbackConfig] = _f(
        [], "Callbacks fed the run's events, e.g. [{name: csv_log, options: {}}]."
    )
    cv: CVConfig = _f(None, "Cross-validation.")
    evaluation: EvalConfig = _f(None, "Evaluation.")
    sweep: SweepConfig = _f(None, "Trials of `tiahnm sweep`.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and dataclasses.is_dataclass(
                _resolve(Config, f.name)
            ):
                setattr(self, f.name, _resolve(Config, f.name)())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what is saved as ``config.yaml``)."""
        return dataclasses.asdict(self)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _resolve(cls: type, name: str) -> Any:
    return _hints(cls)[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return it converted where lossless."""
    return coerce(value, tp, key, nested=_build, numeric_strings=True)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        msg = f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}."
        raise ConfigError(msg)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            msg = f"Unknown config key {where!r}. Known keys here: {', '.join(sorted(names))}."
            raise ConfigError(msg)
    kwargs = {}
    hints = _hints(cls)
    for name, value in data.items():
        kwargs[name] = _coerce(
            value, hints[name], f"{prefix}.{name}" if prefix else name
        )
    return cls(**kwargs)


def from_dict(data: dict[str, Any] | None) -> Config:
    """Validate a nested dict into a :class:`Config`."""
    config = _build(Config, data or {}, "")
    _check_values(config)
    return config


def _check_values(config: Config) -> None:
    checks = [
        (config.train.epochs >= 1, "train.epochs must be >= 1"),
        (config.train.rounds >= 1, "train.rounds must be >= 1"),
        (config.train.lr > 0, "train.lr must be > 0"),
        (config.train.patience >= 1, "train.patience must be >= 1"),
        (config.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (config.train.warmup_epochs >= 0, "train.warmup_epochs must be >= 0"),
        (
            config.train.grad_clip is None or config.train.grad_clip > 0,
            "train.grad_clip must be > 0 (or null: no clipping)",
        ),
        (
            not (config.cv.refit and config.train.rounds > 1),
            "cv.refit cannot be combined with train.rounds > 1 (the refit would "
            "retrain every round for the kept round's epoch count, without the "
            "validation bags that chose the round); set cv.refit: false, the kept "
            "model is then the best on validation over all rounds",
        ),
        (config.cv.folds >= 2, "cv.folds must be >= 2"),
        (config.cv.repeats >= 1, "cv.repeats must be >= 1"),
        (0.0 <= config.cv.val_fraction < 1.0, "cv.val_fraction must be in [0, 1)"),
        (config.evaluation.bootstrap >= 0, "evaluation.bootstrap must be >= 0"),
        (config.evaluation.heatmaps >= -1, "evaluation.heatmaps must be >= -1"),
        (
            not config.extract.annotations or bool(config.extract.slides),
            "extract.annotations labels the patches of extract.slides only; for "
            "image_patches or slide_patches give data.options.instance_labels",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg + ".")


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> Config:
    """Read, override and validate a config.

    Args:
        path (str | PathLike | None): YAML file (``None`` for all defaults).
        overrides (list[str] | None): ``key.sub=value`` strings; values are parsed as
            YAML (``train.epochs=5``, ``head.options.gated=true``, ``losses=[]``).

    Returns:
        Config: The validated config.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            msg = f"{p}: config file not found."
            raise ConfigError(msg)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            msg = f"{p}: not a text file."
            raise ConfigError(msg) from None
        try:
            loaded = _parse_yaml(text)
        except ValueError as exc:
            msg = f"{p}: not valid YAML ({exc})."
            raise ConfigError(msg) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            msg = f"{p}: the top level must be a mapping, got {type(loaded).__name__}."
            raise ConfigError(msg)
        data = loaded
    for item in overrides or []:
        apply_override(data, item)
    try:
        return from_dict(data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with an alias-bomb limit; every failure becomes a ValueError.

    Besides ``YAMLError``, PyYAML's safe constructors raise ``ValueError``,
    ``IndexError``, ``AttributeError`` ... on bad tagged or timestamp scalars
    (``!!int``, ``2001-13-45``, ``!!timestamp``): all of them mean "not valid YAML".
    """
    from tiahnm.utils.safe_yaml import safe_load

    try:
        return safe_load(text)  # refuses alias bombs before building any object
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # the parser's own failures only (see above)
        msg = f"{type(exc).__name__}: {exc}"
        raise ValueError(msg) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override to a nested dict in place."""
    if "=" not in item:
        msg = f"--set {item!r}: expected key=value."
        raise ConfigError(msg)
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        msg = f"--set {item!r}: empty key."
        raise ConfigError(msg)
    try:
        value = _parse_yaml(raw) if raw.strip() else ""
    except ValueError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            msg = f"--set {item!r}: {part!r} is not a mapping."
            raise ConfigError(msg)
        node = child
    node[parts[-1]] = value


def save_config(config: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    from tiahnm.utils.io import atomic_open

    with atomic_open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)


def iter_schema(
    cls: type = Config, prefix: str = ""
) -> list[tuple[str, str, Any, str]]:
    """Rows ``(key, type, default, doc)`` of the whole schema, depth first."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            rows.append((key, "mapping", None, f.metadata.get("doc", "")))
            rows.extend(iter_schema(tp, key + "."))
        else:
            rows.append((key, type_name(tp), value, f.metadata.get("doc", "")))
    return rows


def template() -> str:
    """The commented YAML written by ``tiahnm init``."""
    lines = [
        "# tiahnm run configuration. Every key is optional; defaults are shown.",
        "# Check plugin names with `tiahnm plugins`; override any key on the command line",
        "# with `--set key.sub=value`. The resolved config is saved in output_dir.",
        "# Before `tiahnm run`, say where the data is: data.options (features_dir and",
        "# labels_csv for h5_folder) and/or extract.slides. `tiahnm run --demo` needs none.",
        "",
    ]
    lines.extend(_template_lines(Config, 0))
    return "\n".join(lines) + "\n"


def _template_lines(cls: type, indent: int) -> list[str]:
    pad = "  " * indent
    out = []
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        doc = f.metadata.get("doc", "")
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            out.append(f"{pad}# {doc}")
            out.append(f"{pad}{f.name}:")
            out.extend(_template_lines(tp, indent + 1))
            continue
        out.append(f"{pad}# {doc} ({type_name(tp)})")
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10_000)
        out.append(pad + dumped.strip()[1:-1])
    return out


def reference_markdown() -> str:
    """``docs/configuration.md``: every key with its type, default and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema in `tiahnm/config.py` by",
        "`python -m tiahnm.config > docs/configuration.md`; a test checks it is current.",
        "",
        "Every key is optional. Unknown keys and wrong types are errors naming the key.",
        "`*.options` mappings are passed to the plugin named beside them and checked",
        "against its declared options (see [Component options](#component-options))",
        "or else its signature. Override any key with `--set key.sub=value`.",
        "`callbacks` feed the run's events to loggers (csv_log, tensorboard, mlflow; see",
        "[plugins.md](plugins.md#callbacks-loggers)); `sweep` is read by `tiahnm sweep`",
        "only (see [cli.md](cli.md#tiahnm-sweep)).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, tp, default, doc in iter_schema():
        shown = ""
        if tp != "mapping":
            dumped = yaml.safe_dump(default, default_flow_style=True)
            shown = "`" + dumped.strip().removesuffix("...").strip() + "`"
        escaped = tp.replace("|", r"\|")
        lines.append(f"| `{key}` | {escaped} | {shown} | {doc} |")
    return "\n".join([*lines, *_CPU_PRECISION_NOTE, *_component_options()]) + "\n"


def _component_options() -> list[str]:
    """The section documenting the built-in components' declared options."""
    from tiahnm.plugins import options_markdown

    return [
        "",
        "## Component options",
        "",
        "Built-in components that declare their options as a typed dataclass",
        "(`tiahnm/utils/options.py`): each option's type and bounds, default and",
        "meaning, generated from that class, which also gives the defaults and checks",
        "the values (an error names the full key, e.g. `miner.options.mask_ratio_h`,",
        "exit code 2). The other components' options are their factory's keyword",
        "parameters (unknown and missing names are checked against the signature).",
        "",
        *options_markdown()[:-1],
    ]


_CPU_PRECISION_NOTE = [
    "",
    "`train.cpu_precision` and `extract.cpu_precision` (`tiahnm extract/predict",
    "--cpu-precision`) apply on CPU only (`train.amp` / `--amp` on GPU). `bf16` on a CPU",
    "without AMX or AVX-512 bf16 units (torch's CPU capability report) is a config error",
    "(exit code 2); `auto` there falls back to fp32 with a log line. `auto` on a CPU with",
    "the units runs one probe (the first training bag through the head, or a synthetic",
    "batch through the encoder) in fp32 and bf16 and keeps bf16 only when the mean row",
    "cosine similarity is >= 0.999. `fp32` is exactly the earlier full-precision path.",
    "`tiahnm predict --cpu-precision` applies to the extraction of slide images (its",
    "one head pass per slide stays fp32). Measured speed and accuracy:",
    "docs/benchmarks.md, section bf16 on CPU.",
]


if __name__ == "__main__":
    print(reference_markdown(), end="")
