"""Markdown table of the Musk benchmark from the JSON files musk_cv.py wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = [
    "abmil",
    "abmil_gated",
    "dsmil",
    "transmil",
    "clam_sb",
    "clam_mb",
    "dtfd",
    "mean_pool",
    "max_pool",
]


def main(paths: list[str]) -> None:
    """Print one row per (head, dataset) pair, both datasets side by side."""
    rows: dict[tuple[str, str], dict] = {}
    trivial: dict[str, dict] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data["rows"]:
            rows[(r["head"], r["dataset"])] = r
        for d, v in data["trivial_baseline"].items():
            trivial.setdefault(d, v)
    print(
        "| head | repeats x folds | Musk1 accuracy | Musk1 AUC | published | Musk2 accuracy | Musk2 AUC | published | s/epoch (Musk2) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for head in ORDER:
        cells = [rows.get((head, d)) for d in ("musk1", "musk2")]
        if not any(cells):
            continue
        reps = next(c["repeats"] for c in cells if c)
        out = [head, f"{reps} x 10"]
        for c in cells:
            if c is None:
                out += ["-", "-", "-"]
                continue
            std = (
                c["accuracy_std_repeats"]
                if c["repeats"] > 1
                else c["accuracy_std_folds"]
            )
            out += [
                f"{c['accuracy_mean']:.3f} ± {std:.3f}",
                f"{c['auc_mean']:.3f}",
                f"{c['published_accuracy']:.3f}" if c["published_accuracy"] else "-",
            ]
        out.append(f"{cells[1]['seconds_per_epoch']:.2f}" if cells[1] else "-")
        print("| " + " | ".join(out) + " |")
    for d, v in sorted(trivial.items()):
        print(
            f"\nTrivial baseline ({d}: mean/max/min pooling + logistic regression, C chosen on the same validation bags, same test folds): {v['accuracy_mean']:.3f} ± {v['accuracy_std_folds']:.3f} (std over folds); published 0.86 / 0.85."
        )


if __name__ == "__main__":
    main(sys.argv[1:])
