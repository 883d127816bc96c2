"""The ``jsonl_log`` callback: every epoch row of every fold as one JSON line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tiahnm.callbacks import Callback, RunInfo


class JSONLinesLog(Callback):
    """Appends ``{"fold", "step", **row}`` per epoch to a JSON-lines file.

    The number of lines written is the callback's state: a resumed run first cuts the
    file back to it, so a line written after the last saved state is not doubled.

    Args:
        path (str): The file; relative paths are inside the run's output folder.
    """

    def __init__(self, path: str = "epochs.jsonl") -> None:
        self.path_option = path
        self.file: Path | None = None
        self.lines = 0

    def state_dict(self) -> dict[str, Any]:
        """Lines written."""
        return {"lines": self.lines}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the lines written."""
        self.lines = int(state.get("lines", 0))

    def on_run_start(self, run: RunInfo) -> None:
        """Open the file, cut back to the saved number of lines."""
        path = Path(self.path_option)
        self.file = path if path.is_absolute() else run.output_dir / path
        kept: list[str] = []
        if self.file.is_file():
            kept = self.file.read_text(encoding="utf-8").splitlines()[: self.lines]
        self.lines = len(kept)
        self.file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_epoch_end(self, run: RunInfo, row: dict[str, float]) -> None:
        """Append the row."""
        assert self.file is not None
        with self.file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"fold": run.fold, "step": run.step, **row}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.lines += 1
