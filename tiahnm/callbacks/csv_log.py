"""``csv_log``: one CSV row per epoch of every fold."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from tiahnm.callbacks.base import Callback, RunInfo
from tiahnm.utils.io import atomic_open


class CSVLog(Callback):
    """Appends each epoch's history row to a CSV file.

    Columns: ``fold``, ``step`` (the row's index in the fold) and the row's keys in
    the order they first appear (a new key rewrites the file with the wider header,
    atomically). Every row is appended and synced. The number of rows written is the
    callback's state: a resumed run first cuts the file back to it (dropping a half
    written line or rows written after the last saved state), so no row is doubled.

    Args:
        path (str): The file; relative paths are inside the run's output folder.
    """

    def __init__(self, path: str = "metrics.csv") -> None:
        self.path_option = path
        self.file: Path | None = None
        self.columns: list[str] = []
        self.rows = 0

    def state_dict(self) -> dict[str, Any]:
        """Rows written and the header."""
        return {"rows": self.rows, "columns": list(self.columns)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rows written and the header."""
        self.rows = int(state.get("rows", 0))
        self.columns = [str(c) for c in state.get("columns", [])]

    def on_run_start(self, run: RunInfo) -> None:
        """Open the file; cut it back to the rows of the saved state."""
        path = Path(self.path_option)
        self.file = path if path.is_absolute() else run.output_dir / path
        kept = self._read()[: self.rows] if self.rows else []
        self.rows = len(kept)
        self._rewrite(kept)

    def _read(self) -> list[list[str]]:
        assert self.file is not None
        if not self.file.is_file():
            return []
        with self.file.open(newline="", encoding="utf-8") as fh:
            lines = list(csv.reader(fh))
        # a line cut short by a crash has fewer fields than the header
        return [r for r in lines[1:] if len(r) == len(lines[0])]

    def _rewrite(self, rows: list[list[str]]) -> None:
        assert self.file is not None
        with atomic_open(self.file, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if self.columns:
                writer.writerow(self.columns)
            writer.writerows(rows)

    def on_epoch_end(self, run: RunInfo, row: dict[str, float]) -> None:
        """Append the row (rewrite with a wider header when it has new keys)."""
        values: dict[str, Any] = {"fold": run.fold, "step": run.step, **row}
        new = [k for k in values if k not in self.columns]
        if new:
            old = self._read()
            width = len(self.columns)
            self.columns += new
            self._rewrite([r + [""] * (len(self.columns) - width) for r in old])
        line = io.StringIO()
        csv.writer(line).writerow([_cell(values.get(c)) for c in self.columns])
        assert self.file is not None
        with self.file.open("a", newline="", encoding="utf-8") as fh:
            fh.write(line.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        self.rows += 1


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)
