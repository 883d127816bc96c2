import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from tests.synthetic import make_bags
from tiahnm.evaluation.metrics import (
    add_confidence_intervals,
    bootstrap_ci,
    confidence_intervals,
    instance_metrics,
    instance_threshold,
    metric_table,
    pooled_predictions,
)
from tiahnm.training.metrics import METRICS, binary_metrics


def sk_metrics(y, p, pred):
    neg = y == 0
    two = len(np.unique(y)) == 2
    return {
        "auc": roc_auc_score(y, p) if two else math.nan,
        "accuracy": accuracy_score(y, pred),
        "f1": f1_score(y, pred, zero_division=0),
        "balanced_accuracy": balanced_accuracy_score(y, pred) if two else math.nan,
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
        "fpr": pred[neg].mean() if neg.any() else math.nan,
    }


def fixed_rows():
    rng = np.random.default_rng(7)
    rows = []
    for n in (5, 12, 40):
        y = rng.integers(0, 2, n)
        p = np.round(rng.random(n), 1)  # rounding makes ties
        rows.append((y, p, (p >= 0.5).astype(int)))
    rows.append((np.ones(6, int), np.linspace(0, 1, 6), np.array([0, 1, 1, 0, 1, 1])))
    rows.append((np.zeros(6, int), np.linspace(0, 1, 6), np.zeros(6, int)))
    rows.append((np.array([0, 1, 0, 1]), np.array([0.2, 0.2, 0.2, 0.2]), np.ones(4)))
    return rows


@pytest.mark.parametrize("row", range(6))
def test_metric_table_matches_sklearn(row):
    y, p, pred = fixed_rows()[row]
    got = metric_table(y, p, pred)
    want = sk_metrics(y, p, pred)
    assert set(got) == set(METRICS)
    for k in METRICS:
        assert np.allclose(got[k][0], want[k], equal_nan=True), k


def test_metric_table_rows_are_independent_and_match_binary_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (20, 15))
    p = rng.random((20, 15))
    table = metric_table(y, p, (p >= 0.3).astype(int))
    for i in range(20):
        ref = binary_metrics(y[i], p[i], 0.3)
        for k in METRICS:
            assert np.allclose(table[k][i], ref[k], equal_nan=True), (i, k)


def fold_results(n=30, repeats=2, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    results = []
    for rep in range(repeats):
        probs = np.clip(labels * 0.4 + rng.random(n) * 0.6, 0, 1)
        for fold in range(3):
            idx = np.arange(n)[fold::3]
            thr = 0.45 + 0.05 * fold  # each fold's own (validation) threshold
            results.append(
                {
                    "repeat": rep,
                    "fold": fold,
                    "predictions": [
                        {
                            "slide_id": f"s{i:02d}",
                            "label": int(labels[i]),
                            "probability": float(probs[i]),
                            "prediction": int(probs[i] >= thr),
                        }
                        for i in idx
                    ],
                }
            )
    return results


def test_bootstrap_is_deterministic_and_contains_the_point_estimate():
    pooled = pooled_predictions(fold_results())
    a = bootstrap_ci(pooled, n_resamples=500, seed=1)
    b = bootstrap_ci(pooled, n_resamples=500, seed=1)
    c = bootstrap_ci(pooled, n_resamples=500, seed=2)
    assert a == b
    assert a != c
    for k in METRICS:
        lo, hi = a[k]["ci95"]
        assert lo <= a[k]["pooled"] <= hi, k
        assert hi - lo > 0, k
    # the point estimate is the pooled metric (at each fold's own threshold),
    # averaged over repeats
    acc = np.mean([(p["label"] == p["prediction"]).mean() for p in pooled.values()])
    assert a["accuracy"]["pooled"] == pytest.approx(acc)
    auc = np.mean(
        [roc_auc_score(p["label"], p["probability"]) for p in pooled.values()]
    )
    assert a["auc"]["pooled"] == pytest.approx(auc)


def test_bootstrap_width_shrinks_with_more_slides():
    small = bootstrap_ci(pooled_predictions(fold_results(n=20)), seed=0)
    large = bootstrap_ci(pooled_predictions(fold_results(n=400)), seed=0)
    width = lambda r: r["auc"]["ci95"][1] - r["auc"]["ci95"][0]  # noqa: E731
    assert width(large) < width(small)


def test_add_confidence_intervals_to_summary():
    results = fold_results()
    summary = {"metrics": {k: {"mean": 0.5, "std": 0.1, "n": 6} for k in METRICS}}
    add_confidence_intervals(summary, results, n_resamples=100, seed=3)
    assert summary["ci"]["n_resamples"] == 100 and summary["ci"]["seed"] == 3
    # the pooled estimate and interval of the bootstrap with the given seed
    want = bootstrap_ci(pooled_predictions(results), n_resamples=100, seed=3)
    other = bootstrap_ci(pooled_predictions(results), n_resamples=100, seed=0)
    assert want != other
    for k in METRICS:
        assert len(summary["metrics"][k]["ci95"]) == 2
        assert summary["metrics"][k]["ci95"] == want[k]["ci95"], k
        assert summary["metrics"][k]["pooled"] == want[k]["pooled"], k
        assert summary["metrics"][k]["mean"] == 0.5  # untouched
        assert summary["metrics"][k]["std"] == 0.1 and summary["metrics"][k]["n"] == 6
    assert confidence_intervals(results, n_resamples=0) == {}


def test_multiclass_results_get_no_ci():
    results = fold_results()
    results[0]["predictions"][0]["label"] = 2
    assert confidence_intervals(results, n_resamples=50) == {}


def test_instance_metrics_match_sklearn():
    bags = make_bags(6)
    rng = np.random.default_rng(0)
    scores = [rng.random(b.n_instances) for b in bags]
    got = instance_metrics(bags, scores, threshold=0.6)
    y = np.concatenate([b.instance_labels for b in bags])
    s = np.concatenate(scores)
    assert got["instance_auc"] == pytest.approx(roc_auc_score(y, s))
    assert got["instance_ap"] == pytest.approx(average_precision_score(y, s))
    assert got["instance_f1"] == pytest.approx(f1_score(y, s >= 0.6))
    bags[0].instance_labels = None
    assert instance_metrics(bags, scores) == {}


def test_instance_threshold_rules():
    bags = make_bags(8)
    scores = [b.instance_labels * 0.5 + 0.3 for b in bags]  # positives 0.8, else 0.3
    assert instance_threshold(bags, scores, "0.5") == 0.5
    assert instance_threshold(bags, scores, "youden") == pytest.approx(0.8)
    assert instance_threshold(bags, None, "youden") == 0.5
    with pytest.raises(ValueError, match="Unknown threshold rule"):
        instance_threshold(bags, None, "best")
