"""Cross-validated training from a :class:`~tiahnm.config.Config`.

Writes, in ``config.output_dir``:

* ``config.yaml``: the resolved config;
* ``splits.csv``: every bag's repeat, fold and split;
* ``folds/<r>_<f>/``: ``last.pt`` (resumable), ``best.pt`` (best validation state),
  ``result.json`` (metrics, threshold, history), ``instance_scores.h5`` (per test
  bag, for heatmaps); a fold with ``result.json`` is done and skipped on resume;
* ``predictions.csv``: slide_id, repeat, fold, label, probability, prediction;
* ``summary.json``: ``metrics.<name>.mean`` / ``.std`` over folds, ``.pooled`` /
  ``.ci95`` (bootstrap, :mod:`tiahnm.evaluation`), the same over repeats
  (``repeat_metrics``), and the per-fold rows;
* ``report.md`` with ROC and confusion-matrix plots (:mod:`tiahnm.evaluation.report`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiahnm.callbacks.base import CallbackRunner, build_callbacks
from tiahnm.config import Config, save_config
from tiahnm.data.bag import Bag
from tiahnm.data.cohort import check_patient_labels, patient_bags
from tiahnm.errors import DataError, TrainingDivergedError
from tiahnm.evaluation.fold import evaluate_fold_instances, predict_with_scores
from tiahnm.evaluation.metrics import INSTANCE_METRICS, add_confidence_intervals
from tiahnm.plugins import ensure_options_mapping, get_registry
from tiahnm.runtime.checkpoint import save_checkpoint
from tiahnm.runtime.device import resolve_device
from tiahnm.runtime.distributed import (
    SINGLE,
    DistContext,
    barrier,
    init_distributed,
    local_device,
)
from tiahnm.tasks import Task, build_task, check_miner, default_task
from tiahnm.tasks.evaluate import (
    fold_patient_metrics,
    task_confidence_intervals,
    write_predictions_csv,
)
from tiahnm.training.guards import (
    check_classes,
    diverged,
    read_json_result,
    run_fingerprint,
    watch_divergence,
)
from tiahnm.training.loop import FitResult, fit
from tiahnm.training.metrics import METRICS, aggregate
from tiahnm.training.splits import (
    Fold,
    check_grouping,
    fixed_split,
    kfold_splits,
    read_split_file,
    write_split_file,
)
from tiahnm.utils.io import write_json

logger = logging.getLogger(__name__)


def load_bags(config: Config) -> list[Bag]:
    """Build the configured bag source and read its bags."""
    options = ensure_options_mapping(config.data.options, "data.options")
    source = get_registry("bag_source").create(
        config.data.source, key="data.options", **options
    )
    bags = source.load()
    ids = [b.slide_id for b in bags]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        msg = f"data source {config.data.source!r} returned duplicate bag ids: {dup}."
        raise DataError(msg)
    widths = {b.features.shape[1] for b in bags}
    if len(widths) != 1:
        msg = f"data source {config.data.source!r}: bags have different feature widths {sorted(widths)}."
        raise DataError(msg)
    return bags


def make_folds(
    config: Config, bags: Sequence[Bag], task: Task | None = None
) -> list[Fold]:
    """Folds from the data's split column, a split file, or stratified k-fold CV.

    With patients (``Bag.patient_id``) the generated folds are grouped by patient,
    and every fold, also of a split file or split column, is checked: a patient in
    two of train/val/test is a DataError naming the patient and fold.
    """
    groups = [b.patient_id for b in bags]
    if config.cv.split_file:
        folds = read_split_file(config.cv.split_file, [b.slide_id for b in bags])
        check_grouping(folds, groups, where=str(config.cv.split_file))
        return folds
    splits = [b.split for b in bags]
    if config.cv.use_source_split and all(s is not None for s in splits):
        folds = fixed_split(splits)
        check_grouping(folds, groups, where="the data's split column")
        return folds
    labels = task.stratify_labels(bags) if task is not None else [b.label for b in bags]
    return kfold_splits(
        labels,
        folds=config.cv.folds,
        repeats=config.cv.repeats,
        val_fraction=config.cv.val_fraction,
        seed=config.seed,
        groups=groups if any(groups) else None,
    )


def _standardise(
    bags: Sequence[Bag], train_idx: Sequence[int]
) -> tuple[list[Bag], torch.Tensor, torch.Tensor]:
    feats = torch.cat([bags[i].features for i in train_idx])
    mean = feats.mean(0)
    std = feats.std(0).clamp_min(1e-6)
    out = [
        replace(
            b,
            features=(b.features - mean) / std,
            meta={k: v for k, v in b.meta.items() if k != "storage"},
        )
        for b in bags
    ]
    return out, mean, std


def build_head(config: Config, in_dim: int, n_classes: int) -> torch.nn.Module:
    """The configured head."""
    options = ensure_options_mapping(config.head.options, "head.options")
    head = get_registry("head").create(
        config.head.name, in_dim, n_classes, key="head.options", **options
    )
    if config.evaluation.instance_score is not None:
        head.set_eval_score(config.evaluation.instance_score)
    return head


class _KeepUnknown(dict):
    """``str.format_map`` mapping that leaves unknown ``{names}`` as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def build_miner(config: Config, fold: Fold | None = None) -> Any:
    """The configured miner.

    String options may name the fold: ``{repeat}``, ``{fold}``, ``{fold_name}``
    (``r0_f3``) and ``{output_dir}`` are filled in, so e.g. an MHIM teacher can be
    initialised from the baseline of the same fold:
    ``teacher_init: runs/base/folds/{fold_name}/best.pt``.
    """
    options = ensure_options_mapping(config.miner.options, "miner.options")
    if fold is not None:
        names = {
            "repeat": fold.repeat,
            "fold": fold.fold,
            "fold_name": fold.name,
            "output_dir": config.output_dir,
        }
        options = {
            k: v.format_map(_KeepUnknown(names)) if isinstance(v, str) else v
            for k, v in options.items()
        }
    return get_registry("miner").create(
        config.miner.name, key="miner.options", **options
    )


def build_losses(config: Config) -> list[tuple[Any, float]]:
    """The configured extra losses with their weights."""
    out = []
    for i, spec in enumerate(config.losses):
        options = ensure_options_mapping(spec.options, f"losses[{i}].options")
        loss = get_registry("loss").create(
            spec.name, key=f"losses[{i}].options", **options
        )
        out.append((loss, spec.weight))
    return out


def _val_metrics(
    task: Task, val: Sequence[Bag], probs: np.ndarray, threshold: float, loss: float
) -> dict[str, float]:
    """Metrics of the validation bags under the selected state (empty without any).

    What ``tiahnm sweep`` ranks trials by: it never looks at test metrics.
    """
    if not val:
        return {}
    return {**task.metrics(val, probs, threshold), "loss": loss}


def _progress(config: Config, dctx: DistContext = SINGLE) -> bool:
    return (
        config.train.progress
        and dctx.is_main
        and os.environ.get("TIAHNM_NO_PROGRESS") is None
    )


@dataclass(frozen=True)
class _FoldRun:
    """What every step of one fold shares.

    Attributes:
        config (Config): The run config.
        fold (Fold): The fold.
        fold_dir (Path): Its folder.
        n_classes (int): Head outputs.
        device (torch.device): Where it trains.
        dctx (DistContext): The process group (or one process).
        task (Task): Loss, threshold, metrics and prediction rows.
        seed (int): The fold's seed.
    """

    config: Config
    fold: Fold
    fold_dir: Path
    n_classes: int
    device: torch.device
    dctx: DistContext
    task: Task
    seed: int

    @property
    def result_path(self) -> Path:
        """``result.json``: the fold is done when it exists."""
        return self.fold_dir / "result.json"


def run_fold(
    config: Config,
    bags: Sequence[Bag],
    fold: Fold,
    fold_dir: Path,
    *,
    n_classes: int,
    device: torch.device,
    dctx: DistContext = SINGLE,
    callbacks: CallbackRunner | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """Train and evaluate one fold; returns (and writes) its result.

    ``n_classes`` is the number of head outputs; ``task`` (default: binary or
    multiclass) gives the loss, threshold, metrics and prediction rows.

    Under ``torchrun`` every rank trains (data parallel); rank 0 alone evaluates and
    writes, and the other ranks read its ``result.json``. ``callbacks`` get the
    fit-start, epoch-end and fit-end events.
    """
    run = _FoldRun(
        config,
        fold,
        fold_dir,
        n_classes,
        device,
        dctx,
        task or default_task(n_classes),
        config.seed + 1000 * fold.repeat + fold.fold,
    )
    done = _finished_result(run)
    if done is not None:
        return done
    if dctx.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(run.seed)
    norm = None
    if config.data.standardize:
        bags, mean, std = _standardise(bags, fold.train)
        norm = {"mean": mean, "std": std}
    t0 = time.perf_counter()
    head, res = _train(run, bags, callbacks)
    if not dctx.is_main:
        return _follow_main(run, bags, res.best_epoch)
    return _evaluate(run, bags, head, res, norm, t0)


def _finished_result(run: _FoldRun) -> dict[str, Any] | None:
    """The result of a fold done before (by an earlier run or by rank 0), or None."""
    if run.dctx.is_main:
        read_json_result(run.result_path)  # a damaged result is moved aside, recomputed
    barrier(run.dctx)  # rank 0 may have just written the previous fold or this one
    if run.result_path.is_file():
        return json.loads(run.result_path.read_text())
    return None


def _train(
    run: _FoldRun, bags: Sequence[Bag], callbacks: CallbackRunner | None
) -> tuple[torch.nn.Module, FitResult]:
    """Build and train the fold's head (progress bar, callbacks, divergence guard).

    Returns the head with its best state loaded, and the fit result; rank 0 writes
    the miner's ``mined.json``.
    """
    config, fold = run.config, run.fold
    head = build_head(config, int(bags[0].features.shape[1]), run.n_classes)
    miner = build_miner(config, fold)
    losses = build_losses(config)
    train = [bags[i] for i in fold.train]
    val = [bags[i] for i in fold.val]
    from tqdm.auto import tqdm

    with tqdm(
        total=config.train.epochs * config.train.rounds,
        desc=fold.name,
        leave=False,
        disable=not _progress(config, run.dctx),
    ) as bar:

        def on_epoch_end(row: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(
                {k: f"{v:.3f}" for k, v in row.items() if k.endswith("loss")}
            )
            if callbacks:
                callbacks.epoch_end(row)

        if callbacks:
            callbacks.fit_start()
        try:
            res = fit(
                head,
                train,
                val,
                config.train,
                miner=miner,
                losses=losses,
                device=run.device,
                seed=run.seed,
                checkpoint_dir=run.fold_dir,
                on_epoch_end=watch_divergence(fold.name, on_epoch_end),
                dist_ctx=run.dctx,
                task=run.task,
            )
        except TrainingDivergedError as exc:
            raise diverged(fold.name, run.fold_dir, exc) from None
    if callbacks:
        callbacks.fit_end(res.history)
    head.load_state_dict(res.best_state)
    if run.dctx.is_main and (mined := miner.mined_records()):
        write_json(
            run.fold_dir / "mined.json",
            {"miner": config.miner.name, "records": mined},
        )
    return head, res


def _follow_main(run: _FoldRun, bags: Sequence[Bag], best_epoch: int) -> dict[str, Any]:
    """A rank other than 0: join the refit, then read the result rank 0 wrote."""
    val = [bags[i] for i in run.fold.val]
    if run.config.cv.refit and val:
        _refit(run, [bags[i] for i in run.fold.train] + val, best_epoch)
    barrier(run.dctx)
    return json.loads(run.result_path.read_text())


def _evaluate(
    run: _FoldRun,
    bags: Sequence[Bag],
    head: torch.nn.Module,
    res: FitResult,
    norm: dict[str, torch.Tensor] | None,
    t0: float,
) -> dict[str, Any]:
    """Rank 0: thresholds on validation, refit, test metrics; write the fold's files.

    ``t0`` is when training started (the result's ``seconds`` span fit and refit).
    """
    config, fold, task = run.config, run.fold, run.task
    train = [bags[i] for i in fold.train]
    val = [bags[i] for i in fold.val]
    test = [bags[i] for i in fold.test]
    dtype = res.autocast_dtype
    threshold, val_metrics, val_scores = _validate(run, head, val, dtype)
    best_epoch = res.best_epoch
    if config.cv.refit and val:
        # The epoch count was chosen on validation; the final model also learns from
        # the validation bags. Nothing here looks at the test fold.
        head, res = _refit(run, train + val, best_epoch)
    fit_seconds = time.perf_counter() - t0
    test_probs, metrics, inst = _test(
        run, head, test, val, val_scores, threshold, dtype
    )
    _save_best(
        run,
        head,
        res.best_state,
        in_dim=int(bags[0].features.shape[1]),
        norm=norm,
        threshold=threshold,
        instance_threshold=inst.threshold,
        best_epoch=best_epoch,
        refit=bool(config.cv.refit and val),
    )
    result = {
        "repeat": fold.repeat,
        "fold": fold.fold,
        "n_train": len(res.train_bags),
        "n_generated": sum(b.origin == "generated" for b in res.train_bags),
        "n_val": len(val),
        "n_test": len(test),
        "best_epoch": best_epoch,
        "best_round": res.best_round,
        "epochs_run": len(res.history),
        "threshold": threshold,
        "instance_threshold": inst.threshold,
        "seconds": fit_seconds,
        "seconds_per_epoch": res.seconds_per_epoch,
        "metrics": metrics,
        "val_metrics": val_metrics,
        "predictions": _prediction_rows(task, test, test_probs, threshold),
        "history": res.history,
    }
    result.update(task.fold_extras(test, test_probs, threshold))
    patient = fold_patient_metrics(task, test, test_probs, threshold)
    if patient:
        result["patient_metrics"] = patient
    _write_result(run, result)
    return result


def _validate(
    run: _FoldRun, head: torch.nn.Module, val: list[Bag], dtype: torch.dtype | None
) -> tuple[float, dict[str, float], Any]:
    """The slide threshold, validation metrics and instance scores of ``val``."""
    val_probs, val_loss, val_scores = predict_with_scores(
        head,
        val,
        run.device,
        amp=dtype,
        want_scores=True,  # instance threshold and the heatmaps' validation scale
        task=run.task,
    )
    threshold = run.task.threshold(val, val_probs, run.config.evaluation.threshold)
    val_metrics = _val_metrics(run.task, val, val_probs, threshold, val_loss)
    return threshold, val_metrics, val_scores


def _test(
    run: _FoldRun,
    head: torch.nn.Module,
    test: list[Bag],
    val: list[Bag],
    val_scores: Any,
    threshold: float,
    dtype: torch.dtype | None,
) -> tuple[np.ndarray, dict[str, float], Any]:
    """Test probabilities, slide and instance metrics (the instance threshold on val).

    Returns ``(test_probs, metrics, instance evaluation)``; the instance scores go to
    the fold's ``instance_scores.h5``.
    """
    test_probs, test_loss, inst_scores = predict_with_scores(
        head, test, run.device, amp=dtype, task=run.task
    )
    metrics = run.task.metrics(test, test_probs, threshold)
    metrics["loss"] = test_loss
    inst = evaluate_fold_instances(
        val=val,
        val_scores=val_scores,
        test=test,
        test_scores=inst_scores,
        test_probs=test_probs,
        threshold=threshold,
        rule=run.config.evaluation.instance_threshold,
        fold_dir=run.fold_dir,
        head=head,
        task=run.task,
    )
    metrics.update(inst.metrics)
    return test_probs, metrics, inst


def _save_best(
    run: _FoldRun,
    head: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    in_dim: int,
    norm: dict[str, torch.Tensor] | None,
    threshold: float,
    instance_threshold: float,
    best_epoch: int,
    refit: bool,
) -> None:
    """``best.pt``: the selected (or refit) head with what prediction needs."""
    config = run.config
    save_checkpoint(
        {
            "head": config.head.name,
            "head_options": dict(config.head.options),
            "in_dim": in_dim,
            "n_classes": run.n_classes,
            "state_dict": state,
            "threshold": threshold,
            "instance_threshold": instance_threshold,
            "instance_score": head.default_eval_score,
            "normalisation": norm,
            "task": run.task.describe(),
            "task_spec": run.task.spec(),
            "best_epoch": best_epoch,
            "refit": refit,
            "run": run_fingerprint(config),
        },
        run.fold_dir / "best.pt",
    )


def _write_result(run: _FoldRun, result: dict[str, Any]) -> None:
    """Write ``result.json`` (the fold is done), drop the resume checkpoints."""
    write_json(run.result_path, result)
    (run.fold_dir / "last.pt").unlink(missing_ok=True)
    (run.fold_dir / "refit" / "last.pt").unlink(missing_ok=True)
    barrier(run.dctx)


def _refit(
    run: _FoldRun, bags: list[Bag], best_epoch: int
) -> tuple[torch.nn.Module, FitResult]:
    """Retrain a fresh head on ``bags`` for ``best_epoch + 1`` epochs (same seed)."""
    config = run.config
    torch.manual_seed(run.seed)
    head = build_head(config, int(bags[0].features.shape[1]), run.n_classes)
    res = fit(
        head,
        bags,
        [],
        replace(config.train, epochs=best_epoch + 1),
        miner=build_miner(config, run.fold),
        losses=build_losses(config),
        device=run.device,
        seed=run.seed,
        checkpoint_dir=run.fold_dir / "refit",
        dist_ctx=run.dctx,
        task=run.task,
    )
    head.load_state_dict(res.best_state)
    return head, res


def run_training(
    config: Config, *, bags: Sequence[Bag] | None = None
) -> dict[str, Any]:
    """:func:`_run_training` holding the output folder's write lock (rank 0)."""
    from tiahnm.runtime.distributed import env_context
    from tiahnm.utils.lock import folder_lock

    with folder_lock(config.output_dir, enabled=env_context().is_main):
        return _run_training(config, bags=bags)


def _run_training(
    config: Config, *, bags: Sequence[Bag] | None = None
) -> dict[str, Any]:
    """Cross-validate the configured head + miner + losses; write and return the summary.

    Args:
        config (Config): The run config.
        bags (Sequence[Bag] | None): Bags to use instead of the configured source.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join a process group and
    train each fold data parallel; rank 0 writes every file.

    Returns:
        dict: The content of ``summary.json``.
    """
    dctx = init_distributed(config.train.device)
    out = Path(config.output_dir)
    if dctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    bags = list(bags) if bags is not None else load_bags(config)
    n_classes = max(2, max(b.label for b in bags) + 1)
    task = build_task(config.task.name, config.task.options, n_classes)
    if task.classifies:  # survival labels are events: the task checks those
        check_classes(bags, config.data.source)
    task.check_monitor(config.train.monitor)
    task.check_bags(bags)
    _check_class_names(task, bags, config)
    check_patient_labels(bags)
    if config.data.bag_level == "patient":
        bags = patient_bags(bags)
    n_outputs = task.n_outputs(n_classes)
    folds = make_folds(config, bags, task)
    task.check_folds(bags, folds)
    if dctx.is_main:
        write_split_file(out / "splits.csv", folds, [b.slide_id for b in bags])
    device = local_device(resolve_device(config.train.device), dctx)
    # Builds every component once before training, so a bad name or option fails fast.
    task.check_head(
        build_head(config, int(bags[0].features.shape[1]), n_outputs), config.head.name
    )
    # fold placeholders filled as in the folds; a miner without this task: error
    check_miner(task, build_miner(config, folds[0]), config.miner.name)
    build_losses(config)
    callbacks = build_callbacks(
        config.callbacks if dctx.is_main else [], out, config.to_dict()
    )
    callbacks.run_start()
    from tqdm.auto import tqdm

    results = []
    for fold in tqdm(folds, desc="folds", disable=not _progress(config, dctx)):
        callbacks.fold_start(fold.name)
        results.append(
            run_fold(
                config,
                bags,
                fold,
                out / "folds" / fold.name,
                n_classes=n_outputs,
                device=device,
                dctx=dctx,
                callbacks=callbacks,
                task=task,
            )
        )
        callbacks.fold_end(results[-1])
    summary = summarise(results, config)
    summary["task"] = task.describe()
    summary["task_spec"] = task.spec()
    if task.ci_metrics is None:
        add_confidence_intervals(
            summary, results, n_resamples=config.evaluation.bootstrap, seed=config.seed
        )
    else:
        task_confidence_intervals(
            task,
            summary,
            results,
            n_resamples=config.evaluation.bootstrap,
            seed=config.seed,
        )
    if not dctx.is_main:
        return summary
    write_json(out / "summary.json", summary)
    write_predictions_csv(out / "predictions.csv", results)
    if config.evaluation.report:
        from tiahnm.evaluation.report import write_report_safely

        write_report_safely(out, summary, results, task)
        from tiahnm.evaluation.html_report import write_html_report_safely

        write_html_report_safely(out)
    callbacks.run_end(summary)
    return summary


def _check_class_names(task: Task, bags: Sequence[Bag], config: Config) -> None:
    """The task's check of the data's class names (``meta["class_name"]``)."""
    names: dict[int, str] = {}
    for b in bags:
        if b.meta.get("class_name") is not None:
            names.setdefault(int(b.label), str(b.meta["class_name"]))
    if names:
        where = bags[0].meta.get("labels_csv") or f"data source {config.data.source!r}"
        task.check_class_names([names[k] for k in sorted(names)], str(where))


def _prediction_rows(
    task: Task, bags: Sequence[Bag], probs: np.ndarray, threshold: float
) -> list[dict[str, Any]]:
    """The task's prediction rows, with ``patient_id`` when the bags have one."""
    rows = task.prediction_rows(bags, probs, threshold)
    if any(b.patient_id for b in bags):
        for row, b in zip(rows, bags, strict=True):
            row["patient_id"] = b.patient_id or ""
    return rows


def _metric_keys(rows: Sequence[dict[str, float]]) -> list[str]:
    """The binary and instance metrics first, then any other metric of the task."""
    keys = [*METRICS, *INSTANCE_METRICS]
    for row in rows:
        keys += [k for k in row if k not in keys and k != "loss"]
    return keys


def summarise(results: Sequence[dict[str, Any]], config: Config) -> dict[str, Any]:
    """Aggregate fold results: over folds, and over repeats (mean of each repeat)."""
    rows = [r["metrics"] for r in results]
    val_rows = [r.get("val_metrics", {}) for r in results]
    keys = _metric_keys(rows)
    repeats = sorted({r["repeat"] for r in results})
    repeat_rows = []
    for rep in repeats:
        agg = aggregate([r["metrics"] for r in results if r["repeat"] == rep], keys)
        repeat_rows.append({k: v["mean"] for k, v in agg.items()})
    patient_rows = [r["patient_metrics"] for r in results if r.get("patient_metrics")]
    extra = {}
    if patient_rows:
        extra["patient_metrics"] = {
            k: v
            for k, v in aggregate(patient_rows, _metric_keys(patient_rows)).items()
            if v["n"]
        }
    return extra | {
        "head": config.head.name,
        "miner": config.miner.name,
        "losses": [loss.name for loss in config.losses],
        "n_folds": len(results),
        "metrics": {k: v for k, v in aggregate(rows, keys).items() if v["n"]},
        "repeat_metrics": {
            k: v for k, v in aggregate(repeat_rows, keys).items() if v["n"]
        },
        # validation bags at the selected epoch (what `tiahnm sweep` ranks by)
        "val_metrics": {
            k: v
            for k, v in aggregate(val_rows, [*_metric_keys(val_rows), "loss"]).items()
            if v["n"]
        },
        "seconds_per_epoch": float(
            np.nanmedian([r["seconds_per_epoch"] for r in results])
        ),
        "folds": [
            {
                k: r.get(k)
                for k in (
                    "repeat",
                    "fold",
                    "best_epoch",
                    "best_round",
                    "epochs_run",
                    "threshold",
                    "n_train",
                    "n_generated",
                )
            }
            | {"metrics": r["metrics"]}
            for r in results
        ],
    }
