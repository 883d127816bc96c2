"""The ``regression`` task: a continuous target per bag (``target`` column).

The head gives 2 logits and the prediction is ``logit_1 - logit_0`` (as the Cox risk,
so a head's class-1 instance scores rank the instances' contribution); the loss is
the mean squared error (or Huber) against the raw target. Metrics (scikit-learn /
SciPy): ``mae``, ``rmse``, ``r2``, ``pearson_r``, ``spearman_rho``. Cross-validation
stratifies on the quartile of the target.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tiahnm.errors import ConfigError, DataError
from tiahnm.tasks.base import Task
from tiahnm.utils.options import Options, option, parse

LOSSES = ("mse", "huber")


@dataclass(frozen=True)
class RegressionOptions(Options):
    """Options of :class:`RegressionTask` (``task.options``)."""

    loss: str = option(
        "mse",
        choices=LOSSES,
        help="mse or huber (torch.nn.functional.huber_loss, delta 1).",
    )


class RegressionTask(Task):
    """Continuous bag targets.

    Takes the options of :class:`RegressionOptions` (``task.options``).
    """

    name = "regression"
    classifies = False
    monitors = ("val_loss",)
    primary_metric = "r2"
    score_name = "prediction"
    report_metrics = ("mae", "rmse", "r2", "pearson_r", "spearman_rho")
    ci_metrics = ("mae", "rmse", "r2")

    def __init__(self, **options: Any) -> None:
        self.loss = parse(RegressionOptions, options, key="task.options").loss

    def n_outputs(self, n_classes: int) -> int:
        """Two logits; the prediction is their difference."""
        return 2

    def check_bags(self, bags: Sequence[Any]) -> None:
        """Every bag needs a finite ``target``."""
        for b in bags:
            if b.target is None or not math.isfinite(float(b.target)):
                msg = (
                    f"{b.meta.get('labels_csv') or b.source or 'data'}: bag "
                    f"{b.slide_id!r} has no finite regression target (column "
                    "data.options.target_column, default 'target')."
                )
                raise DataError(msg)

    def check_head(self, head: Any, head_name: str) -> None:
        """Heads whose forward uses class labels cannot serve regression."""
        if head.needs_label_in_forward:
            msg = f"head {head_name!r} uses class labels in its forward and does not support task 'regression'."
            raise ConfigError(msg)

    def stratify_labels(self, bags: Sequence[Any]) -> np.ndarray:
        """The quartile of each bag's target."""
        y = np.asarray([float(b.target) for b in bags], dtype=np.float64)
        edges = np.quantile(y, [0.25, 0.5, 0.75])
        return np.searchsorted(edges, y, side="right").astype(np.int64)

    def criterion(self, logits: Any, bags: Sequence[Any]) -> Any:
        """MSE / Huber of ``logit_1 - logit_0`` against the targets."""
        import torch

        pred = logits[:, 1].float() - logits[:, 0].float()
        y = torch.tensor([float(b.target) for b in bags], device=logits.device)
        if self.loss == "huber":
            return torch.nn.functional.huber_loss(pred, y)
        return torch.nn.functional.mse_loss(pred, y)

    def outputs(self, out: Any) -> Any:
        """``[prediction, logits...]``."""
        import torch

        logits = out.bag_logits.float()[0]
        return torch.cat([(logits[1] - logits[0]).reshape(1), logits])

    def score(self, outputs: np.ndarray) -> np.ndarray:
        """The predicted value."""
        return outputs[:, 0]

    def predicted_labels(self, outputs: np.ndarray, threshold: float) -> np.ndarray:
        """No decision (zeros): the value itself is the prediction."""
        return np.zeros(len(outputs), dtype=np.int64)

    def output_columns(self, outputs: np.ndarray, threshold: float) -> dict[str, Any]:
        """``prediction`` (the value)."""
        return {"prediction": float(outputs.reshape(-1)[0])}

    def target(self, bag: Any) -> int:
        """No integer label (-1)."""
        return -1

    def threshold(
        self, val_bags: Sequence[Any], val_outputs: np.ndarray, rule: str
    ) -> float:
        """Unused (0)."""
        return 0.0

    def metrics(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> dict[str, float]:
        """:func:`regression_metrics` of the predictions."""
        return regression_metrics([float(b.target) for b in bags], outputs[:, 0])

    def prediction_rows(
        self, bags: Sequence[Any], outputs: np.ndarray, threshold: float
    ) -> list[dict[str, Any]]:
        """slide_id, target, prediction."""
        return [
            {
                "slide_id": b.slide_id,
                "label": -1,
                "target": float(b.target),
                "prediction": float(outputs[i, 0]),
            }
            for i, b in enumerate(bags)
        ]

    def from_rows(self, rows: Sequence[dict[str, Any]]) -> tuple[list[Any], np.ndarray]:
        """Targets and ``[n, 1]`` predictions."""
        from tiahnm.tasks.classification import _targets

        targets = _targets(rows)
        for t, r in zip(targets, rows, strict=True):
            t.target = float(r["target"])
        pred = np.asarray([float(r["prediction"]) for r in rows], dtype=np.float64)
        return targets, pred.reshape(-1, 1)

    def spec(self) -> dict[str, Any]:
        """Name and loss."""
        return {"name": self.name, "options": {"loss": self.loss}}

    def describe(self) -> dict[str, Any]:
        """Name and loss."""
        return {"name": self.name, "loss": self.loss}


def regression_metrics(
    targets: Sequence[float], predictions: np.ndarray
) -> dict[str, float]:
    """MAE, RMSE, R², Pearson r and Spearman rho (NaN where undefined)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y = np.asarray(targets, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    out = {k: math.nan for k in RegressionTask.report_metrics}
    if len(y) == 0:
        return out
    out["mae"] = float(mean_absolute_error(y, p))
    out["rmse"] = float(math.sqrt(mean_squared_error(y, p)))
    if len(y) > 1 and np.ptp(y) > 0:
        out["r2"] = float(r2_score(y, p))
        if np.ptp(p) > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["pearson_r"] = float(pearsonr(y, p)[0])
                out["spearman_rho"] = float(spearmanr(y, p)[0])
    return out


__all__ = ["LOSSES", "RegressionTask", "regression_metrics"]
