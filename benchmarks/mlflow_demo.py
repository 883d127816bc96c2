"""The demo (or a small run) logged to a real MLflow tracking server on localhost.

Starts ``mlflow server`` (SQLite store, local artifact root) on a free port, runs
``tiahnm run --demo`` (``--quick``: the 4-slide demo) with the ``mlflow`` callback pointing at it (and
``csv_log``), then reads the run back with ``MlflowClient``: the runs of the
experiment, the number of params, the metric keys, each epoch metric's history
length against ``result.json``, the summary metrics and the artifacts.

Usage::

    python benchmarks/mlflow_demo.py --work-dir runs/mlflow_demo \
        --out benchmarks/results/mlflow_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tiahnm.utils.provenance import provenance, write_result


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').resolve()}",
            "--default-artifact-root", str((root / "artifacts").resolve()),
        ],
        stdout=(root / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def read_back(uri: str, run_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiahnm-demo")
    runs = client.search_runs([exp.experiment_id])
    run = runs[0]
    folds = {}
    for path in sorted((run_dir / "folds").glob("*/result.json")):
        result = json.loads(path.read_text())
        fold = path.parent.name
        history = client.get_metric_history(run.info.run_id, f"{fold}/train_loss")
        folds[fold] = {
            "epochs_in_result_json": len(result["history"]),
            "train_loss_points_in_mlflow": len(history),
            "steps": sorted(m.step for m in history),
            "test_auc_result_json": result["metrics"]["auc"],
            "test_auc_mlflow": run.data.metrics.get(f"{fold}/test_auc"),
        }
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "tracking_uri": uri,
        "experiment": exp.name,
        "n_runs": len(runs),
        "run_name": run.info.run_name,
        "status": run.info.status,
        "n_params": len(run.data.params),
        "params_sample": {
            k: run.data.params[k]
            for k in ("head.name", "miner.name", "train.epochs", "cv.folds")
            if k in run.data.params
        },
        "n_metric_keys": len(run.data.metrics),
        "folds": folds,
        "auc_mean_mlflow": run.data.metrics.get("auc_mean"),
        "auc_mean_summary_json": summary["metrics"]["auc"]["mean"],
        "val_auc_mean_mlflow": run.data.metrics.get("val_auc_mean"),
        "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="runs/mlflow_demo")
    ap.add_argument("--out", default="benchmarks/results/mlflow_demo.json")
    ap.add_argument("--quick", action="store_true", help="the 4-slide quick demo")
    args = ap.parse_args()
    work = Path(args.work_dir)
    (work / "server").mkdir(parents=True, exist_ok=True)
    stamp = provenance()
    proc, uri = start_server(work / "server")
    try:
        callbacks = (
            "callbacks=[{name: csv_log}, {name: mlflow, options: "
            f"{{tracking_uri: '{uri}', experiment: tiahnm-demo}}}}]"
        )
        demo = work / "demo"
        cmd = [
            sys.executable, "-m", "tiahnm", "run", "--demo",
            *(["--quick"] if args.quick else []),
            "--output-path", str(demo), "--set", callbacks,
        ]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=dict(os.environ, TIAHNM_NO_PROGRESS="1"))
        seconds = time.perf_counter() - t0
        payload = {
            "what": "the demo logged to a local MLflow tracking server (mlflow "
            "server, SQLite store) through the mlflow callback, read back with "
            "MlflowClient",
            "command": " ".join(cmd[2:]),
            "run_seconds": round(seconds, 1),
            "mlflow": read_back(uri, demo),
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    write_result(args.out, payload, stamp=stamp)
    print(json.dumps(payload["mlflow"], indent=2))


if __name__ == "__main__":
    main()
