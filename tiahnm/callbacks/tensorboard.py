"""``tensorboard``: TensorBoard event files (``torch.utils.tensorboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tiahnm.callbacks.base import Callback, RunInfo, numbers
from tiahnm.errors import ConfigError

_SKIP = ("round", "epoch")


class TensorBoardLog(Callback):
    """Scalars of every epoch, fold and of the summary, as TensorBoard event files.

    One event folder per fold (``<log_dir>/<fold>``: the epoch rows at step = row index
    in the fold, and ``test/<metric>`` / ``val/<metric>`` at the fold's last step) and
    ``<log_dir>/summary`` (the summary's mean metrics at step 0). A resumed fold opens
    its writer with ``purge_step`` = the rows already logged, so TensorBoard drops
    whatever the interrupted process wrote after its last saved state.

    Args:
        log_dir (str): Folder; relative paths are inside the run's output folder.
        flush_secs (int): Seconds between flushes of the event files.

    Raises:
        ConfigError: If neither ``tensorboard`` nor ``tensorboardX`` is installed.
    """

    def __init__(self, log_dir: str = "tensorboard", flush_secs: int = 10) -> None:
        self.log_dir_option = log_dir
        self.flush_secs = int(flush_secs)
        self.root: Path | None = None
        self.writer: Any = None
        self.steps: dict[str, int] = {}
        self._writer_class()  # fail at build time when the package is missing

    @staticmethod
    def _writer_class() -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                msg = (
                    "callback 'tensorboard' needs the tensorboard package: "
                    "pip install 'tiahnm[tracking]'."
                )
                raise ConfigError(msg) from None
        return SummaryWriter

    def state_dict(self) -> dict[str, Any]:
        """Rows logged per fold."""
        return {"steps": dict(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rows logged per fold."""
        self.steps = {str(k): int(v) for k, v in (state.get("steps") or {}).items()}

    def on_run_start(self, run: RunInfo) -> None:
        """Resolve the log folder."""
        path = Path(self.log_dir_option)
        self.root = path if path.is_absolute() else run.output_dir / path

    def _open(self, name: str, purge_step: int | None = None) -> Any:
        assert self.root is not None
        return self._writer_class()(
            log_dir=str(self.root / name),
            purge_step=purge_step,
            flush_secs=self.flush_secs,
        )

    def on_fit_start(self, run: RunInfo) -> None:
        """Open the fold's writer (purging steps logged after the saved state)."""
        fold = str(run.fold)
        done = self.steps.get(fold)
        self.writer = self._open(fold, purge_step=done if done else None)

    def on_epoch_end(self, run: RunInfo, row: dict[str, float]) -> None:
        """The row's numbers at step ``run.step``."""
        if self.writer is None:
            self.on_fit_start(run)
        for key, value in numbers(row).items():
            if key not in _SKIP:
                self.writer.add_scalar(key, value, run.step)
        self.steps[str(run.fold)] = run.step + 1
        self.writer.flush()

    def on_fold_end(self, run: RunInfo, result: dict[str, Any]) -> None:
        """Test and validation metrics of the fold; close its writer."""
        if self.writer is None:
            self.on_fit_start(run)
        step = max(self.steps.get(str(run.fold), 1) - 1, 0)
        for prefix, metrics in (
            ("test", result.get("metrics")),
            ("val", result.get("val_metrics")),
        ):
            for key, value in numbers(metrics or {}).items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.close()
        self.writer = None

    def on_run_end(self, run: RunInfo, summary: dict[str, Any]) -> None:
        """Mean metrics over folds, in ``<log_dir>/summary``."""
        writer = self._open("summary", purge_step=0)  # a rerun replaces it
        for prefix in ("metrics", "val_metrics"):
            for key, stats in (summary.get(prefix) or {}).items():
                if isinstance(stats, dict) and "mean" in stats:
                    tag = f"{'test' if prefix == 'metrics' else 'val'}/{key}_mean"
                    writer.add_scalar(tag, float(stats["mean"]), 0)
        writer.close()
