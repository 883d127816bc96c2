"""Evaluation: metrics with confidence intervals, reports, heatmaps and prediction.

* :mod:`tiahnm.evaluation.metrics`: slide metrics for many resamples at once, the
  bootstrap CI of the pooled test predictions, instance metrics and thresholds;
* :mod:`tiahnm.evaluation.fold`: what :mod:`tiahnm.crossval` runs per fold;
* :mod:`tiahnm.evaluation.scores`: per-slide instance scores on disk;
* :mod:`tiahnm.evaluation.report`: ``report.md`` with ROC and confusion-matrix plots;
* :mod:`tiahnm.evaluation.heatmap`: heatmap PNGs, GeoJSON and TIAToolbox stores;
* :mod:`tiahnm.evaluation.predict`: predictions for new slides (``tiahnm predict``).

Thresholds (slide and instance) are chosen on validation bags only.
"""

from __future__ import annotations

from tiahnm.evaluation.metrics import (
    INSTANCE_METRICS,
    add_confidence_intervals,
    bootstrap_ci,
    instance_metrics,
    instance_threshold,
    metric_table,
)

__all__ = [
    "INSTANCE_METRICS",
    "add_confidence_intervals",
    "bootstrap_ci",
    "instance_metrics",
    "instance_threshold",
    "metric_table",
]
