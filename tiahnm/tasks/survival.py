"""The ``survival`` task: right-censored times, Cox or discrete-time NLL, c-index."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tiahnm.errors import ConfigError, DataError
from tiahnm.tasks.base import Task
from tiahnm.tasks.survival_losses import (
    TIES,
    assign_bins,
    cox_loss,
    discrete_time_nll,
    quantile_bins,
)
from tiahnm.utils.options import Options, option, parse

LOSSES = ("nll", "cox")


@dataclass(frozen=True)
class SurvivalOptions(Options):
    """Options of :class:`SurvivalTask` (``task.options``)."""

    loss: str = option("nll", choices=LOSSES, help="nll or cox.")
    n_bins: int = option(4, low=2, help="Time bins of nll (4, as MHIM-MIL v2).")
    ties: str = option("breslow", choices=TIES, help="Tie handling of cox.")
    alpha: float = option(
        0.0, help="Extra weight of the uncensored NLL term (0: plain NLL)."
    )


class SurvivalTask(Task):
    """Survival from bags with ``time`` and ``event``.

    Losses:

    * ``nll``: discrete-time NLL over ``n_bins`` bins whose edges are the quantiles of
      the *training fold's* uncensored times (MHIM-MIL v2 / Patch-GCN); the head
      gives ``n_bins`` logits (hazards ``sigmoid``); risk ``= -sum(S)``.
    * ``cox``: negative Cox log partial likelihood (``ties``: breslow / efron) over
      the bags of an optimiser step (``train.batch_size`` bags, or
      ``train.pad_batches``); the head gives 2 logits and the risk is
      ``logit_1 - logit_0`` (so instance scores of class 1 rank instance risk).

    The per-bag output kept by prediction is ``[risk, logits...]``.

    Takes the options of :class:`SurvivalOptions` (``task.options``).
    """

    name = "survival"
    classifies = False
    monitors = ("val_loss", "val_c_index")
    primary_metric = "c_index"

    def __init__(self, **options: Any) -> None:
        opts = parse(SurvivalOptions, options, key="task.options")
        self.loss = opts.loss
        self.n_bins = opts.n_bins
        self.ties = opts.ties
        self.alpha = opts.alpha
        self.couples_bags = opts.loss == "cox"
        self.edges: np.ndarray | None = None
        #: ``(time, event)`` of the bags of the last :meth:`fit` (the censoring
        #: distribution of Uno's c-index and the time-dependent AUC).
        self.train_survival: tuple[np.ndarray, np.ndarray] | None = None

    def n_outputs(self, n_classes: int) -> int:
        """``n_bins`` logits (nll) or 2 (cox)."""
        return self.n_bins if self.loss == "nll" else 2

    def check_bags(self, bags: Sequence[Any]) -> None:
        """Every bag has a finite time >= 0 and an event 0/1; some event overall."""
        for b in bags:
            where = f"{b.source or 'data'}: bag {b.slide_id!r}"
            if b.time is None or not math.isfinite(b.time) or b.time < 0:
                msg = f"{where}: survival time {b.time!r} must be a finite number >= 0."
                raise DataError(msg)
            if b.event not in (0, 1):
                msg = f"{where}: event {b.event!r} must be 0 or 1."
                raise DataError(msg)
        if bags and not any(b.event for b in bags):
            msg = f"{bags[0].source or 'data'}: no bag has an event; survival needs events."
            raise DataError(msg)

    def check_head(self, head: Any, head_name: str) -> None:
        """Heads whose forward uses class labels (CLAM, DTFD) cannot serve survival."""
        if head.needs_label_in_forward:
            msg = (
                f"head {head_name!r} uses class labels in its forward (instance loss) "
                "and does not support task 'survival'."
            )
            raise ConfigError(msg)

    def check_folds(self, bags: Sequence[Any], folds: Sequence[Any]) -> None:
        """Every fold's training part needs an event (bins / risk sets)."""
        for f in folds:
            if not any(bags[i].event for i in f.train):
                where = bags[0].meta.get("labels_csv") or bags[0].source or "data"
                msg = (
                    f"{where}: fold {f.name} has no event among its {len(f.train)} "
                    "training bags (survival needs events to learn from); use fewer "
                    "folds (cv.folds) or a split file with events in every fold."
                )
                raise DataError(msg)

    def stratify_labels(self, bags: Sequence[Any]) -> np.ndarray:
        """Stratify cross-validation by event."""
        return np.asarray([int(b.event) for b in bags], dtype=np.int64)

    def fit(self, train_bags: Sequence[Any]) -> None:
        """Bin edges from the training bags' uncensored times (nll); their survival data."""
        times = np.asarray([b.time for b in train_bags], dtype=np.float64)
        events = np.asarray([b.event for b in train_bags])
        self.train_survival = (times, events.astype(bool))
        if self.loss != "nll":
            return
        if not events.any():
            msg = "survival: a training fold has no events (cannot form time bins); use fewer folds."
            raise DataError(msg)
        self.edges = quantile_bins(times, events, self.n_bins)

    def _bins(self, bags: Sequence[Any], device: torch.device) -> torch.Tensor:
        if self.edges is None:
            msg = "SurvivalTask.fit(train_bags) must run before the nll loss."
            raise RuntimeError(msg)
        times = np.asarray([b.time for b in bags], dtype=np.float64)
        return torch.as_tensor(assign_bins(times, self.edges), device=device)

    def criterion(self, logits: torch.Tensor, bags: Sequence[Any]) -> torch.Tensor:
        """NLL of ``[B, n_bins]`` logits, or Cox loss of ``[B, 2]`` logits."""
        event = torch.tensor([int(b.event) for b in bags], device=logits.device)
        if self.loss == "nll":
            return discrete_time_nll(
                logits, self._bins(bags, logits.device), event, alpha=self.alpha
            )
        time = torch.tensor(
            [float(b.time) for b in bags], device=logits.device, dtype=torch.float64
        )
        risk = (logits[:, 1] - logits[:, 0]).double()
        return cox_loss(risk, time, event, self.ties).float()

    def eval_loss(self, outputs: np.ndarray, bags: Sequence[Any]) -> float | None:
        """Cox loss over all validation bags (nll: the mean bag loss is used)."""
        if self.loss != "cox" or not bags:
            return None
        return float(
            cox_loss(
                torch.as_tensor(outputs[:, 0], dtype=torch.float64),
                torch.tensor([float(b.time) for b in bags], dtype=torch.float64),
                torch.tensor([int(b.event) for b in bags]),
                self.ties,
            )
        )

    def outputs(self, out: Any) -> torch.Tensor:
        """``[risk, logits...]`` of one bag."""
        logits = out.bag_logits.float()[0]
        if self.loss == "nll":
            surv = torch.cumprod(1.0 - torch.sigmoid(logits), dim=0)
            risk = -surv.sum()
        else:
            risk = logits[1] - logits[0]
        return torch.cat([risk.reshape(1), logits])

    def score(self, outputs: np.ndarray) -> np.ndarray:
        """The risk (higher = earlier event)."""
        return outputs[:, 0]

    score_name = "risk"

    def predicted_labels(self, outputs: np.ndarray, threshold: float) -> np.ndarray:
        """1 for the high-risk group (risk >= the validation-chosen cut)."""
        return (outputs[:, 0] >= threshold).astype(np.int64)

    def output_columns(self, outputs: np.ndarray, threshold: float) -> dict[str, Any]:
        """``risk`` and ``high_risk`` (risk >= the mean validation-chosen cut)."""
        risk = float(outputs.reshape(-1)[0])
        return {"risk": risk, "high_risk": int(risk >= threshold)}

    def target(self, bag: Any) -> int:
        """The event indicator."""
        return int(bag.event)

    def spec(self) -> dict[str, Any]:
        """Name and the loss options."""
        return {
            "name": self.name,
            "options": {
                "loss": self.loss,
                "n_bins": self.n_bins,
                "ties": self.ties,
                "alpha": self.alpha,
            },
        }

    def threshold(
        self, val_bags: Sequence[Any], val_outputs: np.ndarray, rule: str
    ) -> float:
        """Risk-group cut: the median validation risk (0 without validation bags)."""
        if not len(val_outputs):
            return 0.0
        return float(np.median(val_outputs[:, 0]))

    def metrics(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> dict[str, float]:
        """Harrell's c-index and the log-rank p-value of the risk groups."""
        time = np.asarray([b.time for b in bags], dtype=np.float64)
        event = np.asarray([b.event for b in bags], dtype=bool)
        risk = outputs[:, 0]
        out = {
            "c_index": harrell_c_index(time, event, risk),
            "logrank_p": logrank_p(time, event, risk >= threshold),
        }
        if self.train_survival is not None:
            out.update(ipcw_metrics(self.train_survival, time, event, risk))
        return out

    def val_row(
        self, val_bags: Sequence[Any], val_outputs: np.ndarray
    ) -> dict[str, float]:
        """``val_c_index``."""
        time = np.asarray([b.time for b in val_bags], dtype=np.float64)
        event = np.asarray([b.event for b in val_bags], dtype=bool)
        return {"val_c_index": harrell_c_index(time, event, val_outputs[:, 0])}

    def prediction_rows(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> list[dict[str, Any]]:
        """slide_id, time, event, risk, high_risk (risk >= the validation median)."""
        return [
            {
                "slide_id": b.slide_id,
                "label": int(b.event),
                "time": float(b.time),
                "event": int(b.event),
                "risk": float(outputs[i, 0]),
                "high_risk": int(outputs[i, 0] >= threshold),
            }
            for i, b in enumerate(bags)
        ]

    ci_metrics = ("c_index",)
    report_metrics = ("c_index", "uno_c_index", "td_auc", "logrank_p")

    def report_sections(
        self,
        run_dir: Any,
        results: Sequence[dict[str, Any]],
        summary: dict[str, Any] | None = None,
    ) -> list[str]:
        """Kaplan-Meier curves of the risk groups (``km.png``) and the log-rank test."""
        from tiahnm.tasks.report import survival_sections

        return survival_sections(run_dir, results)

    def from_rows(self, rows: Sequence[dict[str, Any]]) -> tuple[list[Any], np.ndarray]:
        """Targets (time, event) and ``[n, 1]`` risks."""
        from tiahnm.tasks.classification import _targets

        risk = np.asarray([float(r["risk"]) for r in rows], dtype=np.float64)
        return _targets(rows), risk.reshape(-1, 1)

    def describe(self) -> dict[str, Any]:
        """Loss, bins and ties."""
        return {
            "name": self.name,
            "loss": self.loss,
            "n_bins": self.n_bins if self.loss == "nll" else None,
            "ties": self.ties if self.loss == "cox" else None,
        }


def harrell_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index (scikit-survival's ``concordance_index_censored``); NaN if undefined."""
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event, dtype=bool)
    if len(time) < 2 or not event.any():
        return math.nan
    try:
        return float(
            concordance_index_censored(
                event,
                np.asarray(time, dtype=np.float64),
                np.asarray(risk, dtype=np.float64),
            )[0]
        )
    except ValueError:  # no comparable pairs
        return math.nan


def _structured(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    y = np.empty(len(time), dtype=[("event", bool), ("time", np.float64)])
    y["event"] = np.asarray(event, dtype=bool)
    y["time"] = np.asarray(time, dtype=np.float64)
    return y


def ipcw_metrics(
    train: tuple[np.ndarray, np.ndarray],
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
) -> dict[str, float]:
    """Uno's c-index and the mean time-dependent AUC (scikit-survival, IPCW).

    The censoring distribution is estimated on the training bags ``train``.
    ``uno_c_index`` is truncated at ``tau`` = the 80th percentile of the training
    times; ``td_auc`` is scikit-survival's ``cumulative_dynamic_auc`` mean over the
    25/50/75% quantiles of the training event times (those inside the test
    follow-up). NaN where undefined (no events, times outside the range).
    """
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc

    out = {"uno_c_index": math.nan, "td_auc": math.nan}
    event = np.asarray(event, dtype=bool)
    t_train, e_train = train
    if len(time) < 2 or not event.any() or not e_train.any():
        return out
    y_train, y_test = _structured(t_train, e_train), _structured(time, event)
    tau = float(np.percentile(t_train, 80))
    try:
        out["uno_c_index"] = float(
            concordance_index_ipcw(y_train, y_test, risk, tau=tau)[0]
        )
    except (ValueError, ZeroDivisionError):
        pass
    times = np.quantile(t_train[e_train], [0.25, 0.5, 0.75])
    times = times[(times >= time.min()) & (times < time.max())]
    if times.size:
        try:
            out["td_auc"] = float(
                cumulative_dynamic_auc(y_train, y_test, risk, times)[1]
            )
        except (ValueError, ZeroDivisionError):
            pass
    return out


def logrank_p(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> float:
    """Log-rank p-value between the high- and low-risk groups (scikit-survival)."""
    from sksurv.compare import compare_survival

    high = np.asarray(high, dtype=bool)
    if high.all() or not high.any() or not np.asarray(event).any():
        return math.nan
    y = np.empty(len(time), dtype=[("event", bool), ("time", np.float64)])
    y["event"] = np.asarray(event, dtype=bool)
    y["time"] = np.asarray(time, dtype=np.float64)
    _, p = compare_survival(y, high.astype(int))
    return float(p)


__all__ = ["LOSSES", "SurvivalTask", "harrell_c_index", "ipcw_metrics", "logrank_p"]
