"""The callback contract and the runner that feeds the configured callbacks.

A :class:`Callback` receives Lightning-style events of one ``tiahnm`` run (cross
validation): the run starts, each fold starts, its training starts, every epoch ends
(with the epoch's history row), training ends, the fold ends (with its
``result.json``), the run ends (with ``summary.json``).

:class:`CallbackRunner` calls them in config order and keeps their progress and their
:meth:`Callback.state_dict` in ``<output_dir>/callbacks.json`` (written atomically
after every event), so that a resumed run continues each callback where it stopped:

* an epoch row already delivered to a callback is not delivered again (a resumed
  fold replays the epochs after its last checkpoint; resuming is exact, so these rows
  are the ones already seen);
* rows a callback missed (the process died after the row and before the state was
  saved, or the callback was added to a half-finished run) are delivered at the end of
  the fold from its ``history``, so every callback sees every row of every fold once.

A callback that raises stops the run with a :class:`CallbackError` naming it and the
event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tiahnm.errors import PluginError, TiahnmError
from tiahnm.utils.io import write_json

logger = logging.getLogger(__name__)

STATE_FILE = "callbacks.json"


class CallbackError(TiahnmError, RuntimeError):
    """A callback raised; the message names the callback and the event."""


@dataclass
class RunInfo:
    """What a callback knows about the run.

    Attributes:
        output_dir (Path): The run's output folder.
        config (dict): The resolved config as a plain nested dict.
        fold (str | None): The current fold (``r0_f1``), None outside a fold.
        step (int): Index of the current epoch row in the fold (over rounds).
    """

    output_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    fold: str | None = None
    step: int = 0


class Callback:
    """Base class of callbacks: every event does nothing unless overridden.

    Each event gets the :class:`RunInfo`. Event order within a run: ``on_run_start``;
    per fold ``on_fold_start``, ``on_fit_start``, ``on_epoch_end`` per epoch,
    ``on_fit_end``, ``on_fold_end``; then ``on_run_end``. A resumed run starts with
    ``on_run_start`` again, after :meth:`load_state_dict`. Callbacks run on the main
    process only (rank 0 under ``torchrun``).
    """

    def on_run_start(self, run: RunInfo) -> None:
        """The run (or its resumption) starts."""

    def on_fold_start(self, run: RunInfo) -> None:
        """Fold ``run.fold`` starts."""

    def on_fit_start(self, run: RunInfo) -> None:
        """Training of fold ``run.fold`` starts."""

    def on_epoch_end(self, run: RunInfo, row: dict[str, float]) -> None:
        """An epoch ended; ``row`` is its history row, ``run.step`` its index."""

    def on_fit_end(self, run: RunInfo, history: list[dict[str, float]]) -> None:
        """Training of fold ``run.fold`` ended with this history."""

    def on_fold_end(self, run: RunInfo, result: dict[str, Any]) -> None:
        """Fold ``run.fold`` ended; ``result`` is its ``result.json``."""

    def on_run_end(self, run: RunInfo, summary: dict[str, Any]) -> None:
        """The run ended; ``summary`` is ``summary.json``."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state to restore on resume (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called before ``on_run_start``)."""


@dataclass
class _Progress:
    """What one callback has been given of one fold."""

    rows: int = 0
    last: tuple[int, int] | None = None
    started: bool = False
    fit_started: bool = False
    fit_done: bool = False
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "last": list(self.last) if self.last else None,
            "started": self.started,
            "fit_started": self.fit_started,
            "fit_done": self.fit_done,
            "done": self.done,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Progress:
        last = d.get("last")
        return cls(
            rows=int(d.get("rows", 0)),
            last=(int(last[0]), int(last[1])) if last else None,
            started=bool(d.get("started")),
            fit_started=bool(d.get("fit_started")),
            fit_done=bool(d.get("fit_done")),
            done=bool(d.get("done")),
        )


def _row_key(row: dict[str, Any]) -> tuple[int, int]:
    return int(row.get("round", 0)), int(row.get("epoch", 0))


class CallbackRunner:
    """Calls the configured callbacks and keeps their state across resumes.

    Args:
        callbacks (Sequence[tuple[str, Callback]]): ``(name, callback)`` in order.
        output_dir (str | Path): The run folder (``callbacks.json`` goes there).
        config (dict | None): The resolved config, handed to the callbacks.
    """

    def __init__(
        self,
        callbacks: Sequence[tuple[str, Callback]],
        output_dir: str | Path,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.callbacks = {
            f"{i}:{name}": (name, cb) for i, (name, cb) in enumerate(callbacks)
        }
        self.run = RunInfo(Path(output_dir), dict(config or {}))
        self.path = self.run.output_dir / STATE_FILE
        self.progress: dict[str, dict[str, _Progress]] = {k: {} for k in self.callbacks}
        #: had ``on_run_end`` (a rerun of a finished run leaves them alone)
        self.ended: set[str] = set()
        #: had ``on_run_start`` in this process
        self.started: set[str] = set()
        if self.callbacks:
            self._load()

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def _load(self) -> None:
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        for key, (name, cb) in self.callbacks.items():
            entry = saved.get(key) if isinstance(saved, dict) else None
            if not isinstance(entry, dict):
                continue
            folds = entry.get("folds") or {}
            self.progress[key] = {f: _Progress.from_dict(p) for f, p in folds.items()}
            if entry.get("ended"):
                self.ended.add(key)
            _call(name, "load_state_dict", cb, entry.get("state") or {})

    def _save(self) -> None:
        if not self.callbacks:
            return
        data = {}
        for key, (name, cb) in self.callbacks.items():
            folds = {f: p.to_dict() for f, p in self.progress[key].items()}
            data[key] = {
                "state": _call(name, "state_dict", cb),
                "folds": folds,
                "ended": key in self.ended,
            }
        write_json(self.path, data)

    def _start(self, key: str) -> None:
        if key not in self.started:
            self.started.add(key)
            self.ended.discard(key)
            name, cb = self.callbacks[key]
            _call(name, "on_run_start", cb, replace(self.run, fold=None))

    def _active(self) -> list[tuple[_Progress, str, Callback]]:
        """``(progress, name, callback)`` of those that have not had the whole fold."""
        fold = str(self.run.fold)
        out = []
        for key, (name, cb) in self.callbacks.items():
            prog = self.progress[key].get(fold)
            if prog is not None and prog.done:
                continue
            self._start(key)
            out.append((self.progress[key].setdefault(fold, _Progress()), name, cb))
        return out

    def run_start(self) -> None:
        """``on_run_start`` of every callback that has not ended the run already.

        One that has (a rerun of a finished run) is started again only when an event
        it has not had turns up.
        """
        self.run.fold = None
        for key in self.callbacks:
            if key not in self.ended:
                self._start(key)
        self._save()

    def fold_start(self, fold: str) -> None:
        """``on_fold_start`` for the callbacks that have not started ``fold``."""
        self.run.fold = fold
        for prog, name, cb in self._active():
            if not prog.started:
                prog.started = True
                _call(name, "on_fold_start", cb, self.run)
        self._save()

    def fit_start(self) -> None:
        """``on_fit_start`` for the callbacks that have not had it in this fold."""
        for prog, name, cb in self._active():
            self._fit_start(prog, name, cb)
        self._save()

    def _fit_start(self, prog: _Progress, name: str, cb: Callback) -> None:
        if not prog.started:
            prog.started = True
            _call(name, "on_fold_start", cb, self.run)
        if not prog.fit_started:
            prog.fit_started = True
            _call(name, "on_fit_start", cb, self.run)

    def _deliver(
        self, prog: _Progress, name: str, cb: Callback, row: dict[str, Any]
    ) -> None:
        if prog.last is not None and _row_key(row) <= prog.last:
            return  # had it before the resume
        self.run.step = prog.rows
        _call(name, "on_epoch_end", cb, self.run, row)
        prog.rows += 1
        prog.last = _row_key(row)

    def epoch_end(self, row: dict[str, Any]) -> None:
        """``on_epoch_end`` with ``row`` for the callbacks that have not had it."""
        for prog, name, cb in self._active():
            self._fit_start(prog, name, cb)
            self._deliver(prog, name, cb, row)
        self._save()

    def _fit_end(
        self, prog: _Progress, name: str, cb: Callback, history: list[dict[str, Any]]
    ) -> None:
        self._fit_start(prog, name, cb)
        if not prog.fit_done:
            for row in history:
                self._deliver(prog, name, cb, row)
            prog.fit_done = True
            _call(name, "on_fit_end", cb, self.run, history)

    def fit_end(self, history: list[dict[str, Any]]) -> None:
        """Rows of ``history`` a callback missed, then ``on_fit_end``."""
        for prog, name, cb in self._active():
            self._fit_end(prog, name, cb, history)
        self._save()

    def fold_end(self, result: dict[str, Any]) -> None:
        """Whatever a callback missed of the fold, then ``on_fold_end``."""
        history = list(result.get("history", []))
        for prog, name, cb in self._active():
            self._fit_end(prog, name, cb, history)
            prog.done = True
            _call(name, "on_fold_end", cb, self.run, result)
        self.run.fold = None
        self._save()

    def run_end(self, summary: dict[str, Any]) -> None:
        """``on_run_end`` of every callback started in this process."""
        self.run.fold = None
        for key, (name, cb) in self.callbacks.items():
            if key in self.started:
                _call(name, "on_run_end", cb, self.run, summary)
                self.started.discard(key)
                self.ended.add(key)
        self._save()


def _call(name: str, event: str, cb: Callback, *args: Any) -> Any:
    """``cb.<event>(*args)``; an exception becomes a :class:`CallbackError`."""
    try:
        return getattr(cb, event)(*args)
    except Exception as exc:
        msg = f"callback {name!r} failed in {event}: {type(exc).__name__}: {exc}"
        raise CallbackError(msg) from exc


def build_callbacks(
    specs: Sequence[Any], output_dir: str | Path, config: dict[str, Any] | None = None
) -> CallbackRunner:
    """A runner over the callbacks named in ``config.callbacks``.

    Args:
        specs (Sequence): Items with ``name`` and ``options`` (``CallbackConfig``).
        output_dir (str | Path): The run folder.
        config (dict | None): The resolved config as a dict.

    Returns:
        CallbackRunner: Empty (falsy) when there are no callbacks.
    """
    from tiahnm.plugins import ensure_options_mapping, get_registry

    registry = get_registry("callback")
    built = []
    for i, spec in enumerate(specs):
        key = f"callbacks[{i}].options"
        options = ensure_options_mapping(spec.options, key)
        cb = registry.create(spec.name, key=key, **options)
        if not isinstance(cb, Callback):
            msg = (
                f"callback {spec.name!r}: its factory returned "
                f"{type(cb).__name__}, not a tiahnm.callbacks.Callback."
            )
            raise PluginError(msg)
        built.append((spec.name, cb))
    return CallbackRunner(built, output_dir, config)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of mappings by index (``a.0.b``)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}.{i}"))
    elif prefix:
        out[prefix] = data
    return out


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The real-number entries of ``row`` (bools and strings left out)."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
