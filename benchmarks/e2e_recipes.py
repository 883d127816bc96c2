"""End-to-end defaults and example recipes against the trivial baseline (issue 18).

Reads finished runs (``summary.json``, ``folds/*/result.json``, ``splits.csv``,
``config.yaml``) and, for each, the trivial baseline on exactly the same folds:
mean/max/min pooling of the bag's instance features (for image bags: the flattened
pixels) + logistic regression, its C chosen on the same validation bags (as
``musk_cv.py``). Pairs of runs on identical splits (``--pair A B``) also get
two-sided Wilcoxon signed-rank p-values of the per-fold bag AUC and accuracy
differences (scipy). A fold "collapses" when its best epoch is 0-2 or its test AUC
is below 0.6. Writes one JSON through ``tiahnm.utils.provenance.write_result``.

Usage::

    python benchmarks/e2e_recipes.py --runs NAME=DIR ... --pair A B ... --out F
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fold_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Per-fold test AUC, accuracy, best epoch and validation metrics of a run."""
    rows = []
    for path in sorted((run_dir / "folds").glob("*/result.json")):
        r = json.loads(path.read_text())
        rows.append(
            {
                "fold": path.parent.name,
                "auc": float(r["metrics"]["auc"]),
                "accuracy": float(r["metrics"]["accuracy"]),
                "best_epoch": int(r["best_epoch"]),
                "epochs_run": int(r["epochs_run"]),
                "final_train_loss": float(r["history"][-1]["train_loss"]),
                "val_auc": float(r["val_metrics"].get("auc", float("nan"))),
            }
        )
    return rows


def trivial_baseline(run_dir: Path) -> dict[str, Any]:
    """Pooling + logistic regression on the run's own folds (C on validation)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from tiahnm.config import load_config
    from tiahnm.crossval import load_bags
    from tiahnm.training.splits import read_split_file

    bags = load_bags(load_config(run_dir / "config.yaml"))
    x = np.stack(
        [
            torch.cat(
                [b.features.mean(0), b.features.max(0).values, b.features.min(0).values]
            ).numpy()
            for b in bags
        ]
    )
    y = np.asarray([b.label for b in bags])
    folds = read_split_file(run_dir / "splits.csv", [b.slide_id for b in bags])
    done = {p.parent.name for p in (run_dir / "folds").glob("*/result.json")}
    folds = [f for f in folds if f.name in done]  # the run's finished folds only
    accs, aucs = [], []
    for f in folds:
        tr, va, te = list(f.train), list(f.val), list(f.test)
        scaler = StandardScaler().fit(x[tr])
        best = None
        for c in (0.01, 0.1, 1.0, 10.0):
            clf = LogisticRegression(C=c, max_iter=5000)
            clf.fit(scaler.transform(x[tr]), y[tr])
            val_acc = clf.score(scaler.transform(x[va]), y[va])
            if best is None or val_acc > best[0]:
                best = (val_acc, clf)
        clf = best[1]
        xt = scaler.transform(x[te])
        accs.append(float(clf.score(xt, y[te])))
        aucs.append(float(roc_auc_score(y[te], clf.predict_proba(xt)[:, 1])))
    return {
        "accuracy": _stats(accs),
        "auc": _stats(aucs),
        "folds": [{"accuracy": a, "auc": u} for a, u in zip(accs, aucs, strict=True)],
    }


def _stats(vals: list[float]) -> dict[str, float]:
    a = np.asarray(vals, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def wilcoxon_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p of ``a - b`` (None: all differences 0)."""
    from scipy.stats import wilcoxon

    d = np.asarray(a, float) - np.asarray(b, float)
    if not np.any(d != 0):
        return None
    return float(wilcoxon(d).pvalue)


def summarise(run_dir: Path) -> dict[str, Any]:
    """One run: per-fold rows, means, collapsed folds, baseline on its folds."""
    rows = fold_rows(run_dir)
    base = trivial_baseline(run_dir)
    return {
        "run_dir": str(run_dir),
        "n_folds": len(rows),
        "auc": _stats([r["auc"] for r in rows]),
        "accuracy": _stats([r["accuracy"] for r in rows]),
        "best_epochs": [r["best_epoch"] for r in rows],
        "collapsed_folds": sum(r["best_epoch"] <= 2 or r["auc"] < 0.6 for r in rows),
        "folds": rows,
        "trivial_baseline": base,
        "p_auc_vs_baseline": wilcoxon_p(
            [r["auc"] for r in rows], [f["auc"] for f in base["folds"]]
        ),
        "p_accuracy_vs_baseline": wilcoxon_p(
            [r["accuracy"] for r in rows], [f["accuracy"] for f in base["folds"]]
        ),
    }


def main() -> None:
    """Summarise the runs and write the JSON."""
    from tiahnm.utils.provenance import write_result

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar="NAME")
    p.add_argument("--commands", nargs="*", default=[])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dirs = dict(item.split("=", 1) for item in args.runs)
    results = {name: summarise(Path(d)) for name, d in dirs.items()}
    pairs = {}
    for a, b in args.pair:
        same = (Path(dirs[a]) / "splits.csv").read_text() == (
            Path(dirs[b]) / "splits.csv"
        ).read_text()
        if not same:
            raise SystemExit(f"{a} and {b} ran on different splits")
        fa = {r["fold"]: r for r in results[a]["folds"]}
        fb = {r["fold"]: r for r in results[b]["folds"]}
        common = sorted(set(fa) & set(fb))
        pairs[f"{b} vs {a}"] = {
            "folds": common,
            **{
                k: wilcoxon_p([fb[f][k] for f in common], [fa[f][k] for f in common])
                for k in ("auc", "accuracy")
            },
        }
    for name, r in results.items():
        base = r["trivial_baseline"]
        print(
            f"{name}: AUC {r['auc']['mean']:.3f} ± {r['auc']['std']:.3f}, acc "
            f"{r['accuracy']['mean']:.3f}; baseline AUC {base['auc']['mean']:.3f}, acc "
            f"{base['accuracy']['mean']:.3f} (p AUC {r['p_auc_vs_baseline']}); best "
            f"epochs {r['best_epochs']}; collapsed {r['collapsed_folds']}"
        )
    print(json.dumps(pairs, indent=1))
    write_result(
        args.out,
        {
            "protocol": "per-fold test metrics of finished runs; trivial baseline "
            "(mean/max/min pooling + logistic regression, C in 0.01..10 chosen on "
            "validation accuracy) on the same folds; Wilcoxon signed-rank "
            "two-sided; collapsed: best epoch <= 2 or test AUC < 0.6",
            "commands": args.commands,
            "runs": results,
            "pairs": pairs,
        },
    )


if __name__ == "__main__":
    main()
