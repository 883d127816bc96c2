import math

import numpy as np
import pytest
from sklearn import metrics as skm

from tiahnm.training.metrics import aggregate, binary_metrics, choose_threshold


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = np.clip(y * 0.3 + rng.random(50) * 0.7, 0, 1)
    m = binary_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    tn, fp, _fn, _tp = skm.confusion_matrix(y, pred).ravel()
    assert m["fpr"] == pytest.approx(fp / (fp + tn))


def test_auc_nan_with_one_class():
    m = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9])
    assert math.isnan(m["auc"])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_youden_threshold_on_validation():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.35, 0.8, 0.9]
    assert choose_threshold(y, p, "youden") == pytest.approx(0.35)
    assert choose_threshold(y, p, "0.5") == 0.5
    assert choose_threshold([1, 1], [0.2, 0.3], "youden") == 0.5
    with pytest.raises(ValueError):
        choose_threshold(y, p, "max")


def test_aggregate_mean_std():
    rows = [{"auc": 0.8}, {"auc": 0.9}, {"auc": float("nan")}]
    agg = aggregate(rows, ["auc"])
    assert agg["auc"]["mean"] == pytest.approx(0.85)
    assert agg["auc"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert agg["auc"]["n"] == 2
