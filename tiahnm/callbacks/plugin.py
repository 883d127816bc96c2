"""Built-in callbacks, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_callbacks(register: Register) -> None:
    """Register the built-in callbacks."""
    from tiahnm.callbacks.csv_log import CSVLog
    from tiahnm.callbacks.mlflow import MLflowLog
    from tiahnm.callbacks.tensorboard import TensorBoardLog

    register("csv_log", CSVLog, description="One CSV row per epoch of every fold")
    register(
        "tensorboard",
        TensorBoardLog,
        description="TensorBoard event files: epochs, folds and summary",
    )
    register(
        "mlflow",
        MLflowLog,
        description="MLflow run: config params, epoch/fold/summary metrics, artifacts",
    )
