"""The classic MIL CSV format: ``label, bag_id, f1, f2, ...`` (no header)."""

from __future__ import annotations

import csv
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from tiahnm.data.bag import Bag
from tiahnm.errors import DataError


class MILCSVSource:
    """Bags from a CSV with one instance per row.

    Column 0 is the bag label, column 1 the bag id, the rest are features (the layout
    of the Musk, Fox, Tiger and Elephant benchmarks). A bag's label must be the same on
    every row of the bag.

    Args:
        path (str): CSV file.
        header (bool): Skip a header row.
        instance_label_column (int | None): Optional column holding instance labels
            (evaluation only); it is excluded from the features.
    """

    def __init__(
        self,
        path: str,
        *,
        header: bool = False,
        instance_label_column: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.header = header
        self.instance_label_column = instance_label_column

    def load(self) -> list[Bag]:
        """Read the bags, in order of first appearance."""
        if not self.path.is_file():
            msg = f"{self.path}: MIL CSV file not found."
            raise DataError(msg)
        rows: OrderedDict[str, list[tuple[int, list[float], int | None]]] = (
            OrderedDict()
        )
        width = None
        try:
            with self.path.open(newline="") as fh:
                reader = csv.reader(fh)
                for lineno, row in enumerate(reader, start=1):
                    if lineno == 1 and self.header:
                        continue
                    if not row or all(not c.strip() for c in row):
                        continue
                    if len(row) < 3:
                        msg = f"{self.path}, row {lineno}: expected label, bag_id and features."
                        raise DataError(msg)
                    label = self._integer(row[0], lineno, "label")
                    bag_id = row[1].strip()
                    if not bag_id:
                        msg = f"{self.path}, row {lineno}: empty bag id."
                        raise DataError(msg)
                    cols = row[2:]
                    inst = None
                    if self.instance_label_column is not None:
                        idx = self.instance_label_column - 2
                        if not 0 <= idx < len(cols):
                            msg = (
                                f"{self.path}, row {lineno}: no instance label column "
                                f"{self.instance_label_column} ({len(row)} columns)."
                            )
                            raise DataError(msg)
                        inst = self._integer(cols.pop(idx), lineno, "instance label")
                    try:
                        feats = [float(c) for c in cols]
                    except ValueError:
                        msg = f"{self.path}, row {lineno}: non-numeric feature value."
                        raise DataError(msg) from None
                    if not feats:
                        msg = f"{self.path}, row {lineno}: no feature columns."
                        raise DataError(msg)
                    if width is None:
                        width = len(feats)
                    elif len(feats) != width:
                        msg = (
                            f"{self.path}, row {lineno}: {len(feats)} features, "
                            f"expected {width} as on the first row."
                        )
                        raise DataError(msg)
                    if not np.all(np.isfinite(feats)):
                        msg = (
                            f"{self.path}, row {lineno}: NaN or infinite feature value."
                        )
                        raise DataError(msg)
                    rows.setdefault(bag_id, []).append((label, feats, inst))
        except UnicodeDecodeError as exc:
            msg = f"{self.path}: not a text CSV file ({exc})."
            raise DataError(msg) from None
        except csv.Error as exc:
            msg = f"{self.path}: malformed CSV ({exc})."
            raise DataError(msg) from None
        if not rows:
            msg = f"{self.path}: no bags found."
            raise DataError(msg)
        bags = []
        for bag_id, items in rows.items():
            labels = {lab for lab, _, _ in items}
            if len(labels) != 1:
                msg = f"{self.path}: bag {bag_id!r} has rows with different labels {sorted(labels)}."
                raise DataError(msg)
            feats = torch.tensor(np.asarray([f for _, f, _ in items], dtype=np.float32))
            inst = None
            if self.instance_label_column is not None:
                inst = np.asarray([i for _, _, i in items], dtype=np.int64)
            bags.append(
                Bag(
                    slide_id=bag_id,
                    label=labels.pop(),
                    features=feats,
                    instance_labels=inst,
                    source=str(self.path),
                )
            )
        return bags

    def _integer(self, text: str, lineno: int, what: str) -> int:
        """An integral number (``1``, ``1.0``) from a cell, or a DataError naming the row."""
        try:
            value = float(text)
        except ValueError:
            msg = f"{self.path}, row {lineno}: {what} {text!r} is not a number."
            raise DataError(msg) from None
        if not value.is_integer():
            msg = f"{self.path}, row {lineno}: {what} {text!r} is not an integer."
            raise DataError(msg)
        return int(value)
