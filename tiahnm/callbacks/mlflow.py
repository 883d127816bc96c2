"""``mlflow``: one MLflow run per tiahnm run (a local database or a tracking server)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tiahnm.callbacks.base import Callback, RunInfo, flatten, numbers
from tiahnm.errors import ConfigError

_BAD = re.compile(r"[^\w\-. :/]")
_ARTIFACTS = ("summary.json", "report.md", "config.yaml", "predictions.csv")
_BATCH = 100  # MLflow's limit of params (and a safe size for metrics) per call


def _key(name: str) -> str:
    return _BAD.sub("_", name)


class MLflowLog(Callback):
    """Params, per-epoch metrics, fold and summary metrics, and artifacts in MLflow.

    * params: the flattened resolved config (``head.options.embed_dim`` ...);
    * ``<fold>/<key>`` for every number of every epoch row, with ``step`` = the row's
      index in the fold; ``<fold>/test_<metric>`` and ``<fold>/val_<metric>`` when
      the fold ends;
    * ``<metric>_mean`` / ``<metric>_std`` (test) and ``val_<metric>_mean`` of the
      summary when the run ends, with ``summary.json``, ``report.md``,
      ``config.yaml`` and ``predictions.csv`` as artifacts.

    The MLflow run id is the callback's state: a resumed tiahnm run logs into the
    same MLflow run, and leaves out the epoch rows the run already holds (those the
    interrupted process logged after its last saved state), so every step is logged
    once.

    Args:
        tracking_uri (str | None): ``http://host:port`` of a tracking server, or a
            database URI; default ``sqlite:///<output_dir>/mlflow.db`` with artifacts
            in ``<output_dir>/mlartifacts``.
        experiment (str): Experiment name (created when missing).
        run_name (str | None): Run name (default: the output folder's name).
        artifact_location (str | None): Artifact root of a new experiment (default:
            the server's, or ``<output_dir>/mlartifacts`` for the default database).
        log_artifacts (bool): Upload the summary, report, config and predictions.
        tags (dict | None): Extra run tags.

    Raises:
        ConfigError: If MLflow is not installed.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "tiahnm",
        run_name: str | None = None,
        artifact_location: str | None = None,
        *,
        log_artifacts: bool = True,
        tags: dict[str, Any] | None = None,
    ) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            msg = "callback 'mlflow' needs MLflow: pip install 'tiahnm[tracking]'."
            raise ConfigError(msg) from None
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.log_artifacts = bool(log_artifacts)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.client: Any = None
        self.run_id: str | None = None
        #: steps already in the MLflow run, per fold (read once after a resume)
        self._logged: dict[str, set[int]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The MLflow run id."""
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the MLflow run of the interrupted process."""
        self.run_id = state.get("run_id")
        self._logged = {} if self.run_id else None

    def on_run_start(self, run: RunInfo) -> None:
        """Connect; create the experiment and the run (or reopen the saved run)."""
        from mlflow.tracking import MlflowClient

        uri, artifacts = self.tracking_uri, self.artifact_location
        if uri is None:
            uri = f"sqlite:///{(run.output_dir / 'mlflow.db').resolve()}"
            artifacts = artifacts or (run.output_dir / "mlartifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if self.run_id is not None and self._run_exists(self.run_id):
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self._logged = None  # a new MLflow run holds nothing yet
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(
                self.experiment, artifact_location=artifacts
            )
        )
        tags = {"tiahnm.output_dir": str(run.output_dir.resolve()), **self.tags}
        created = self.client.create_run(
            exp_id, tags=tags, run_name=self.run_name or run.output_dir.name
        )
        self.run_id = created.info.run_id
        self._log_params(run.config)

    def _run_exists(self, run_id: str) -> bool:
        try:
            found = self.client.get_run(run_id)
        except Exception:  # deleted, or another store
            return False
        return found.info.lifecycle_stage == "active"

    def _log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [
            Param(_key(k)[:250], str(v)[:6000]) for k, v in flatten(config).items()
        ]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _BATCH])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])

    def on_epoch_end(self, run: RunInfo, row: dict[str, float]) -> None:
        """``<fold>/<key>`` at ``step = run.step``."""
        values = {f"{run.fold}/{k}": v for k, v in numbers(row).items()}
        if values and self._logged is not None:
            fold = str(run.fold)
            if fold not in self._logged:
                history = self.client.get_metric_history(
                    self.run_id, next(iter(values))
                )
                self._logged[fold] = {m.step for m in history}
            if run.step in self._logged[fold]:
                return
        self._log_metrics(values, run.step)

    def on_fold_end(self, run: RunInfo, result: dict[str, Any]) -> None:
        """``<fold>/test_<metric>``, ``<fold>/val_<metric>``, ``<fold>/best_epoch``."""
        values = {f"{run.fold}/best_epoch": float(result.get("best_epoch", -1))}
        for prefix, metrics in (
            ("test", result.get("metrics")),
            ("val", result.get("val_metrics")),
        ):
            for k, v in numbers(metrics or {}).items():
                values[f"{run.fold}/{prefix}_{k}"] = v
        self._log_metrics(values, 0)

    def on_run_end(self, run: RunInfo, summary: dict[str, Any]) -> None:
        """Summary metrics and artifacts; the MLflow run is marked finished."""
        values = {}
        for prefix, section in (("", "metrics"), ("val_", "val_metrics")):
            for k, stats in (summary.get(section) or {}).items():
                if isinstance(stats, dict):
                    for stat in ("mean", "std"):
                        if isinstance(stats.get(stat), (int, float)):
                            values[f"{prefix}{k}_{stat}"] = float(stats[stat])
        self._log_metrics(values, 0)
        if self.log_artifacts:
            for name in _ARTIFACTS:
                path = Path(run.output_dir) / name
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")
