"""The mlflow callback against a real MLflow tracking server started on localhost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.callbacks.helpers import (
    CallbackTestPlugin,
    Interrupt,
    fold_results,
    tiny_config,
)
from tiahnm.crossval import run_training
from tiahnm.plugins import get_plugin_manager

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free localhost port (SQLite store); its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(mlflow_cli),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers share the group: stopped together
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "mlflow server did not start:\n"
                    + (root / "server.log").read_text(errors="replace")[-3000:]
                )
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def test_a_resumed_run_is_one_mlflow_run_with_every_metric_once(server, tmp_path):
    """Killed in fold 2 and resumed: one MLflow run holding the config as params,
    every epoch of every fold once (step = epoch row), fold, summary metrics and
    the artifacts, read back from the server."""
    get_plugin_manager().register(CallbackTestPlugin(), name="test-callbacks")
    Interrupt.armed = True
    callbacks = [
        {"name": "mlflow", "options": {"tracking_uri": server, "experiment": "t1"}},
        {"name": "interrupt"},
    ]
    config = tiny_config(tmp_path, callbacks, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    summary = run_training(config)

    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name("t1")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["head.name"] == "abmil"
    assert run.data.params["head.options.embed_dim"] == "16"
    assert run.data.params["callbacks.0.name"] == "mlflow"
    for fold, result in fold_results(tmp_path / "out").items():
        history = client.get_metric_history(run.info.run_id, f"{fold}/train_loss")
        got = sorted((m.step, m.value) for m in history)
        assert got == [
            (i, pytest.approx(h["train_loss"])) for i, h in enumerate(result["history"])
        ]
        assert run.data.metrics[f"{fold}/test_auc"] == pytest.approx(
            result["metrics"]["auc"]
        )
        assert run.data.metrics[f"{fold}/val_auc"] == pytest.approx(
            result["val_metrics"]["auc"]
        )
    assert run.data.metrics["auc_mean"] == pytest.approx(
        summary["metrics"]["auc"]["mean"]
    )
    assert run.data.metrics["val_auc_mean"] == pytest.approx(
        summary["val_metrics"]["auc"]["mean"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.yaml", "predictions.csv"} <= artifacts
