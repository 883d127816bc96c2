"""Thresholds are chosen on validation data only: spies on what the choosers get."""

import csv

import numpy as np

from tests.evaluation.conftest import train_config, write_features
from tiahnm import crossval as cv
from tiahnm.evaluation import fold as fold_module
from tiahnm.tasks import classification


def read_splits(path):
    folds: dict[str, dict[str, set[str]]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            name = f"r{row['repeat']}_f{row['fold']}"
            folds.setdefault(name, {"train": set(), "val": set(), "test": set()})
            folds[name][row["split"]].add(row["slide_id"])
    return folds


def test_thresholds_see_only_validation_bags(tmp_path, monkeypatch):
    predicted = []  # (slide ids, probs) of every prediction made in a fold
    slide_calls = []  # (labels, probs) given to the slide threshold chooser
    instance_calls = []  # slide ids whose instance labels the chooser may read

    real_predict = cv.predict_with_scores
    real_choose = classification.choose_threshold
    real_instance = fold_module.instance_threshold

    def spy_predict(head, bags, device, **kw):
        out = real_predict(head, bags, device, **kw)
        predicted.append(([b.slide_id for b in bags], out[0]))
        return out

    def spy_choose(labels, probs, rule):
        slide_calls.append((list(labels), np.asarray(probs)))
        return real_choose(labels, probs, rule)

    def spy_instance(val_bags, val_scores, rule):
        instance_calls.append({b.slide_id for b in val_bags})
        return real_instance(val_bags, val_scores, rule)

    monkeypatch.setattr(cv, "predict_with_scores", spy_predict)
    monkeypatch.setattr(classification, "choose_threshold", spy_choose)
    monkeypatch.setattr(fold_module, "instance_threshold", spy_instance)

    labels = write_features(tmp_path / "features", n_bags=12)
    cfg = train_config(
        tmp_path, tmp_path / "features", labels, instance_threshold="youden"
    )
    cv.run_training(cfg)
    splits = read_splits(tmp_path / "run" / "splits.csv")
    assert len(slide_calls) == len(instance_calls) == len(splits) == 2
    for name, (labels_given, probs_given), inst_ids in zip(
        sorted(splits), slide_calls, instance_calls, strict=True
    ):
        split = splits[name]
        # the probabilities handed to the chooser are those of the validation bags
        sources = [ids for ids, p in predicted if np.array_equal(p[:, 1], probs_given)]
        assert sources and set(sources[0]) == split["val"], name
        assert len(labels_given) == len(split["val"])
        assert inst_ids == split["val"]
        assert not inst_ids & split["test"]
