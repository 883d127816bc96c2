"""``tiahnm sweep``: trials over config keys, each a normal ``tiahnm run``.

The sweep spec is the ``sweep`` section of the run config (``tiahnm run`` ignores
it)::

    sweep:
      method: grid            # or optuna (TPE)
      metric: val_auc         # val_<metric>: validation bags only
      direction: maximize
      n_trials: 20            # optuna only
      params:
        miner.options.mask_ratio_h: [0.01, 0.03, 0.05]
        miner.options.consistency_weight: {low: 0.1, high: 1.0, log: true}  # optuna

Every trial is the run config with the trial's values set, run by
:func:`tiahnm.pipeline.run_pipeline` in ``<output_dir>/trials/<id>/`` (``<id>``: a
hash of the trial's values, so a retried trial resumes its own folder). Optuna's
study storage (``sqlite:///<output_dir>/sweep.db`` by default, any database URL for
several machines) schedules the trials: a grid is put in the study's queue, and
``--jobs N`` processes (on any number of machines sharing the storage) take trials
from it. A launch re-queues trials that failed or were interrupted (no finished
trial with their values) and leaves finished ones alone.

Trials are ranked by the validation metric alone (``summary.json`` ->
``val_metrics``: the mean over folds of the validation bags' metric under each
fold's selected state). ``sweep_summary.json`` and ``sweep.md`` report the ranking
and the test metrics of the chosen trial only.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import itertools
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tiahnm.config import Config, from_dict
from tiahnm.errors import ConfigError, DataError
from tiahnm.pipeline import settings_hash
from tiahnm.utils.io import atomic_open, write_json

logger = logging.getLogger(__name__)

SUMMARY = "sweep_summary.json"
REPORT = "sweep.md"
_SCALARS = (str, int, float, bool, type(None))
_HEARTBEAT_S, _GRACE_S = 20, 60


@dataclass(frozen=True)
class Param:
    """One swept config key.

    Attributes:
        key (str): Dotted config key.
        choices (list | None): Values (grid, or categorical in an Optuna search).
        low (float | None): Lower bound of a range (optuna).
        high (float | None): Upper bound of a range (optuna).
        log (bool): Sample the range on a log scale.
        step (float | None): Step of the range.
        integer (bool): The range is of integers.
    """

    key: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False


@dataclass(frozen=True)
class SweepSpec:
    """The validated ``sweep`` section."""

    method: str
    metric: str
    direction: str
    n_trials: int | None
    params: tuple[Param, ...]
    study_name: str

    def identity(self) -> dict[str, Any]:
        """What a study must keep between launches (``n_trials`` may grow)."""
        return {
            "method": self.method,
            "metric": self.metric,
            "direction": self.direction,
            "params": {p.key: _param_dict(p) for p in self.params},
        }


def _param_dict(p: Param) -> dict[str, Any]:
    if p.choices is not None:
        return {"choices": p.choices}
    return {"low": p.low, "high": p.high, "log": p.log, "step": p.step}


def _parse_range(key: str, value: dict[str, Any]) -> Param:
    where = f"sweep.params.{key}"
    unknown = set(value) - {"low", "high", "log", "step"}
    if unknown:
        msg = f"{where}: unknown range key(s) {sorted(unknown)}; use low, high, log, step."
        raise ConfigError(msg)
    bounds = [value.get("low"), value.get("high")]
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        msg = f"{where}: a range needs numeric low and high, got {value!r}."
        raise ConfigError(msg)
    low, high = bounds
    if not low < high:
        msg = f"{where}: low ({low}) must be below high ({high})."
        raise ConfigError(msg)
    log, step = value.get("log", False), value.get("step")
    if not isinstance(log, bool) or (log and low <= 0):
        msg = f"{where}: log must be true or false, and a log range needs low > 0."
        raise ConfigError(msg)
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        msg = f"{where}: step must be a positive number, got {step!r}."
        raise ConfigError(msg)
    integer = all(isinstance(v, int) for v in (low, high, step) if v is not None)
    return Param(key, low=low, high=high, log=log, step=step, integer=integer)


def _parse_param(key: str, value: Any, method: str) -> Param:
    where = f"sweep.params.{key}"
    if isinstance(value, dict):
        if method == "grid":
            msg = f"{where}: a grid needs a list of values, got a range {value!r}."
            raise ConfigError(msg)
        return _parse_range(key, value)
    if not isinstance(value, list) or not value:
        msg = f"{where}: expected a non-empty list of values, got {value!r}."
        raise ConfigError(msg)
    bad = [v for v in value if not isinstance(v, _SCALARS)]
    if bad:
        msg = f"{where}: values must be numbers, strings, booleans or null, got {bad[0]!r}."
        raise ConfigError(msg)
    if len({repr(v) for v in value}) != len(value):
        msg = f"{where}: repeated values in {value!r}."
        raise ConfigError(msg)
    return Param(key, choices=list(value))


def parse_spec(config: Config) -> SweepSpec:
    """Validate ``config.sweep``; errors name the key.

    Raises:
        ConfigError: On an empty or malformed ``params``, a metric that is not a
            validation metric, or an optuna search without ``n_trials``.
    """
    from tiahnm.training.metrics import METRICS

    sw = config.sweep
    if not sw.params:
        msg = "sweep.params: give at least one config key to sweep, e.g. {miner.options.mask_ratio_h: [0.01, 0.03]}."
        raise ConfigError(msg)
    names = [*METRICS, "loss"]
    if not sw.metric.startswith("val_") or sw.metric[4:] not in names:
        msg = (
            f"sweep.metric: {sw.metric!r} is not a validation metric; trials are "
            f"ranked on validation data only: {', '.join('val_' + n for n in names)}."
        )
        raise ConfigError(msg)
    if sw.method == "optuna" and (sw.n_trials is None or sw.n_trials < 1):
        msg = f"sweep.n_trials: an optuna search needs n_trials >= 1, got {sw.n_trials!r}."
        raise ConfigError(msg)
    params = tuple(_parse_param(k, v, sw.method) for k, v in sw.params.items())
    return SweepSpec(
        sw.method, sw.metric, sw.direction, sw.n_trials, params, sw.study_name
    )


def expand_grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the values, the first key varying slowest."""
    keys = [p.key for p in spec.params]
    values = [p.choices or [] for p in spec.params]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (list items by index) in the nested dict ``data``."""
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            msg = f"sweep.params.{key}: {part!r} is not a mapping or a list index."
            raise ConfigError(msg)
        if not isinstance(node, (dict, list)):
            msg = f"sweep.params.{key}: {part!r} holds a value, not a mapping."
            raise ConfigError(msg)
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            msg = f"sweep.params.{key}: {last!r} is not an index of that list."
            raise ConfigError(msg)
        node[int(last)] = value
    else:
        node[last] = value


def trial_config(base: dict[str, Any], params: dict[str, Any], out: Path) -> Config:
    """The run config of one trial: ``base`` with ``params`` set, writing to ``out``."""
    data = copy.deepcopy(base)
    data.pop("sweep", None)
    for key, value in params.items():
        if key in ("output_dir", "sweep") or key.startswith("sweep."):
            msg = f"sweep.params.{key}: this key cannot be swept."
            raise ConfigError(msg)
        _set(data, key, value)
        try:
            from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"sweep.params.{key}: {exc}") from None
    data["output_dir"] = str(out)
    config = from_dict(data)
    _check_options(config, params)
    return config


def _check_options(config: Config, params: dict[str, Any]) -> None:
    """Component options of the trial against the plugins' factories."""
    from tiahnm.plugins import get_registry

    items = [
        ("head", config.head.name, config.head.options, "head.options", 2),
        ("miner", config.miner.name, config.miner.options, "miner.options", 0),
        ("bag_source", config.data.source, config.data.options, "data.options", 0),
    ]
    items += [
        ("loss", s.name, s.options, f"losses.{i}.options", 0)
        for i, s in enumerate(config.losses)
    ]
    for kind, name, options, key, n_args in items:
        swept = [k for k in params if k.startswith(key + ".")]
        if not swept:
            continue
        try:
            get_registry(kind)[name].check(options, key=key, n_args=n_args)
        except ConfigError as exc:
            raise ConfigError(f"sweep.params.{swept[0]}: {exc}") from None


def validate(base: dict[str, Any], spec: SweepSpec, out: Path) -> None:
    """Build every grid point's config (or a range's bounds) once, before any trial."""
    points = expand_grid(spec) if spec.method == "grid" else []
    for bound in ("low", "high") if spec.method == "optuna" else ():
        points.append(
            {
                p.key: p.choices[0] if p.choices is not None else getattr(p, bound)
                for p in spec.params
            }
        )
    for point in points:
        trial_config(base, point, out / "trials" / trial_id(point))


def trial_id(params: dict[str, Any]) -> str:
    """Folder name of the trial with these values (stable across launches)."""
    return settings_hash(params)[:10]


def validation_value(summary: dict[str, Any], metric: str) -> float:
    """``summary.json``'s mean over folds of validation metric ``val_<name>``."""
    stats = (summary.get("val_metrics") or {}).get(metric[len("val_") :])
    value = stats.get("mean") if isinstance(stats, dict) else None
    return math.nan if value is None else float(value)


def default_storage(out: Path) -> str:
    """``sqlite:///<out>/sweep.db``."""
    return f"sqlite:///{(out / 'sweep.db').resolve()}"


def _sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None: another database)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return None if parsed.database == ":memory:" else Path(parsed.database)


@functools.cache
def _storage_class() -> type:
    """``RDBStorage`` whose trial-state changes hold a file lock beside the database.

    Optuna pops a queued trial by reading it as WAITING and then setting it RUNNING.
    Its ``SELECT ... FOR UPDATE`` is a no-op on SQLite, and the read runs outside a
    write transaction, so two processes could both pop one trial (seen in CI: both
    workers ran grid point 0 and point 1 was left to the launching process). The
    lock makes read-check-write one step for every process of this machine, which
    is where a SQLite file lives; server databases lock the row themselves.
    """
    import optuna

    class LockedSQLiteStorage(optuna.storages.RDBStorage):
        lock_path: Path

        def set_trial_state_values(self, trial_id, state, values=None):  # type: ignore[no-untyped-def]
            with self.lock_path.open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    return super().set_trial_state_values(trial_id, state, values)
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    return LockedSQLiteStorage


def make_storage(url: str) -> Any:
    """Optuna's database storage with heartbeats (a killed trial is retried).

    A SQLite storage is a :func:`_storage_class` storage: one trial is popped by one
    process only.
    """
    import optuna

    kwargs: dict[str, Any] = {}
    storage_class: type = optuna.storages.RDBStorage
    db = _sqlite_path(url)
    if db is not None:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        storage_class = _storage_class()
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = storage_class(
                    url,
                    heartbeat_interval=_HEARTBEAT_S,
                    grace_period=_GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
                    **kwargs,
                )
                if db is not None:
                    storage.lock_path = db.with_name(db.name + ".lock")
                return storage
        except SQLAlchemyError:
            # two launches creating the same new database at once: the loser retries
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError  # pragma: no cover - the loop returns or raises


def open_study(spec: SweepSpec, storage: str, seed: int, worker: int = 0) -> Any:
    """Create or load the study; a stored study must have the same spec."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (
        optuna.samplers.TPESampler(seed=seed + worker)
        if spec.method == "optuna"
        else optuna.samplers.RandomSampler(seed=seed + worker)
    )
    study = optuna.create_study(
        study_name=spec.study_name,
        storage=make_storage(storage),
        sampler=sampler,
        direction=spec.direction,
        load_if_exists=True,
    )
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", spec.identity())
    elif stored != spec.identity():
        changed = [k for k in spec.identity() if stored.get(k) != spec.identity()[k]]
        msg = (
            f"sweep.{changed[0] if changed else 'params'}: study {spec.study_name!r} in "
            f"{redact(storage)} was made with another sweep spec (changed: "
            f"{', '.join('sweep.' + c for c in changed)}); use another output "
            "folder, --storage or sweep.study_name."
        )
        raise ConfigError(msg)
    return study


def redact(url: str) -> str:
    """``url`` without a password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: shown as given
        return url


def _trial_params(trial: Any) -> dict[str, Any]:
    return dict(trial.params or trial.system_attrs.get("fixed_params") or {})


def queue_trials(study: Any, spec: SweepSpec) -> int:
    """Queue the grid points (and failed trials) that no trial has or will finish.

    Returns:
        int: Trials queued now.
    """
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)  # trials of dead processes (heartbeat stopped)
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    trials = study.get_trials(deepcopy=False)
    have = [_trial_params(t) for t in trials if t.state in live]
    wanted = expand_grid(spec) if spec.method == "grid" else []
    wanted += [_trial_params(t) for t in trials if t.state == TrialState.FAIL]
    queued = 0
    for params in wanted:
        if params and params not in have:
            study.enqueue_trial(params, user_attrs={"queued": True})
            have.append(params)
            queued += 1
    return queued


@dataclass(frozen=True)
class _Job:
    """What a worker process needs (picklable)."""

    base: dict[str, Any]
    spec: SweepSpec
    out: str
    storage: str
    seed: int
    worker: int
    n_trials: int


def _suggest(trial: Any, p: Param) -> Any:
    if p.choices is not None:
        return trial.suggest_categorical(p.key, p.choices)
    if p.integer:
        return trial.suggest_int(
            p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
        )
    return trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock``: a trial with the same values waits, then resumes."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_objective(job: _Job, echo: Callable[[str], None]) -> Callable[[Any], float]:
    """The Optuna objective: one pipeline run, valued by its validation metric."""
    import optuna

    from tiahnm.pipeline import run_pipeline

    out = Path(job.out)

    def objective(trial: Any) -> float:
        if job.spec.method == "grid" and not trial.user_attrs.get("queued"):
            # another worker took the last queued point first
            raise optuna.TrialPruned("the grid queue is empty")
        params = {p.key: _suggest(trial, p) for p in job.spec.params}
        tid = trial_id(params)
        folder = out / "trials" / tid
        trial.set_user_attr("id", tid)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        config = trial_config(job.base, params, folder)
        echo(f"[trial {trial.number} {tid}] {params}")
        with _locked(folder):
            result = run_pipeline(config, echo=lambda s: echo(f"[trial {tid}] {s}"))
        value = validation_value(result.summary, job.spec.metric)
        if math.isnan(value):
            msg = (
                f"{folder / 'summary.json'}: {job.spec.metric} is undefined "
                "(no validation bags, or a single class in them)."
            )
            raise DataError(msg)
        val = {
            k: v["mean"] for k, v in (result.summary.get("val_metrics") or {}).items()
        }
        trial.set_user_attr("val_metrics", val)
        return value

    return objective


def _has_waiting(study: Any) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def run_worker(job: _Job, echo: Callable[[str], None] | None = None) -> int:
    """Run ``job.n_trials`` trials from the study (fewer when the grid queue empties).

    Returns:
        int: Trials this worker ran.
    """
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    say = echo or (lambda s: print(s, flush=True))
    threads = job.base.get("train", {}).get("num_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    study = open_study(job.spec, job.storage, job.seed, job.worker)
    objective = make_objective(job, say)
    ran = 0
    if job.spec.method == "grid":
        while ran < job.n_trials and _has_waiting(study):
            study.optimize(objective, n_trials=1, catch=())
            ran += 1
        return ran
    stop = MaxTrialsCallback(job.spec.n_trials or 0, states=(TrialState.COMPLETE,))
    study.optimize(objective, n_trials=job.n_trials, callbacks=[stop], catch=())
    return job.n_trials


def _shares(total: int, jobs: int) -> list[int]:
    return [n for n in (total // jobs + (i < total % jobs) for i in range(jobs)) if n]


def run_sweep(
    config: Config,
    *,
    storage: str | None = None,
    jobs: int = 1,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep of ``config.sweep``; write and return the summary.

    Args:
        config (Config): The run config with its ``sweep`` section.
        storage (str | None): Optuna storage URL (default: SQLite in the output folder).
        jobs (int): Worker processes on this machine.
        echo (Callable | None): One line per trial and stage (default: print).

    Returns:
        dict: The content of ``sweep_summary.json``.
    """
    if jobs < 1:
        msg = f"--jobs must be >= 1, got {jobs}."
        raise ConfigError(msg)
    say = echo or (lambda s: print(s, flush=True))
    spec = parse_spec(config)
    try:
        import optuna  # noqa: F401
    except ImportError:
        msg = "tiahnm sweep needs Optuna: pip install 'tiahnm[sweep]'."
        raise ConfigError(msg) from None
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = config.to_dict()
    if jobs > 1 and base["train"].get("num_threads") is None:
        base["train"]["num_threads"] = max(1, (os.cpu_count() or 1) // jobs)
    validate(base, spec, out)
    url = storage or default_storage(out)
    study = open_study(spec, url, config.seed)
    queue_trials(study, spec)
    remaining = _to_run(study, spec)
    say(f"[sweep] {spec.method} on {spec.metric}: {remaining} trial(s) to run")
    jobs_list = [
        _Job(base, spec, str(out), url, config.seed, i, n)
        for i, n in enumerate(_shares(remaining, jobs))
    ]
    if len(jobs_list) == 1:
        run_worker(jobs_list[0], say)
    elif jobs_list:
        with ProcessPoolExecutor(len(jobs_list), mp_context=get_context("spawn")) as ex:
            for future in [ex.submit(run_worker, job) for job in jobs_list]:
                future.result()
        left = _to_run(study, spec) if spec.method == "grid" else 0
        if left:  # points another launch queued meanwhile
            run_worker(_Job(base, spec, str(out), url, config.seed, 0, left), say)
    return write_summary(study, spec, out, url)


def _to_run(study: Any, spec: SweepSpec) -> int:
    """Queued grid points, or the trials an optuna search still needs."""
    from optuna.trial import TrialState

    def count(*states: Any) -> int:
        return len(study.get_trials(deepcopy=False, states=states))

    if spec.method == "grid":
        return count(TrialState.WAITING)
    busy = count(TrialState.COMPLETE, TrialState.RUNNING)
    return max(0, (spec.n_trials or 0) - busy)


def rank_trials(study: Any, spec: SweepSpec) -> list[Any]:
    """Finished trials, best validation value first (ties: earlier trial first).

    A trial whose values an earlier trial had (two launches that queued the same
    grid point at once, or Optuna proposing a point again) is the same run (same
    folder) and is listed once.
    """
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    first: dict[str, Any] = {}
    for t in sorted(done, key=lambda t: t.number):
        first.setdefault(t.user_attrs.get("id") or trial_id(t.params), t)
    sign = -1.0 if spec.direction == "maximize" else 1.0
    return sorted(first.values(), key=lambda t: (sign * float(t.value), t.number))


def write_summary(study: Any, spec: SweepSpec, out: Path, url: str) -> dict[str, Any]:
    """``sweep_summary.json`` and ``sweep.md``: the ranking; test metrics of the best."""
    from importlib.metadata import version

    from tiahnm import __version__

    ranked = rank_trials(study, spec)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    rows = [
        {
            "rank": i + 1,
            "number": t.number,
            "id": t.user_attrs.get("id"),
            "params": dict(t.params),
            spec.metric: float(t.value),
            "val_metrics": t.user_attrs.get("val_metrics", {}),
            "dir": f"trials/{t.user_attrs.get('id')}",
        }
        for i, t in enumerate(ranked)
    ]
    summary = {
        "method": spec.method,
        "metric": spec.metric,
        "direction": spec.direction,
        "study_name": spec.study_name,
        "storage": redact(url),
        "ranking": (
            f"trials ranked by {spec.metric} (ties: the earlier trial): the mean over "
            "folds of the validation bags' metric under each fold's selected state; "
            "test metrics are read for the chosen trial only"
        ),
        "trial_states": states,
        "versions": {"tiahnm": __version__, "optuna": version("optuna")},
        "trials": rows,
        "best": _best(rows[0], out) if rows else None,
    }
    write_json(out / SUMMARY, summary)
    with atomic_open(out / REPORT, "w", encoding="utf-8") as fh:
        fh.write(markdown(summary))
    return summary


def _best(row: dict[str, Any], out: Path) -> dict[str, Any]:
    import json

    path = out / row["dir"] / "summary.json"
    best = {k: row[k] for k in ("number", "id", "params", "dir")}
    try:
        trial_summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        best["test_metrics"] = None
        best["note"] = f"{path} is not readable here (another machine's folder?)"
        return best
    best["n_folds"] = trial_summary.get("n_folds")
    best["test_metrics"] = trial_summary.get("metrics", {})
    return best


def markdown(summary: dict[str, Any]) -> str:
    """A short report of the sweep."""
    metric = summary["metric"]
    lines = [
        f"# Sweep ({summary['method']}, {summary['direction']} {metric})",
        "",
        summary["ranking"][0].upper() + summary["ranking"][1:] + ".",
        "",
        f"| rank | trial | {metric} | values |",
        "|---|---|---|---|",
    ]
    for r in summary["trials"]:
        shown = ", ".join(f"`{k}`={v}" for k, v in r["params"].items())
        lines.append(f"| {r['rank']} | {r['id']} | {r[metric]:.4f} | {shown} |")
    best = summary["best"]
    if best:
        lines += ["", f"Chosen: trial {best['id']} ({best['dir']}).", ""]
        tests = best.get("test_metrics") or {}
        if tests:
            lines += [
                "| test metric (chosen trial only) | mean | std |",
                "|---|---|---|",
            ]
            lines += [
                f"| {k} | {v['mean']:.4f} | {v['std']:.4f} |" for k, v in tests.items()
            ]
        else:
            lines.append(best.get("note", ""))
    return "\n".join(lines) + "\n"


__all__ = [
    "Param",
    "SweepSpec",
    "expand_grid",
    "parse_spec",
    "rank_trials",
    "run_sweep",
    "trial_config",
    "validation_value",
    "write_summary",
]
