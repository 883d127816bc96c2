"""The cases of issue 20: no code from configs, nothing read outside the data, one
writer per output folder, and an ``Error:`` line with a documented exit code instead
of a traceback (``docs/reliability.md`` lists the same cases).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.cli import cli
from tiahnm.config import load_config
from tiahnm.errors import (
    EXIT_DATA,
    EXIT_INTERNAL,
    EXIT_LOCKED,
    EXIT_RESOURCE,
    EXIT_USAGE,
    ConfigError,
    DataError,
    PluginError,
)
from tiahnm.heads.pooling import MeanPoolingMIL
from tiahnm.hookspecs import hookimpl
from tiahnm.plugins import get_plugin_manager

REPO = Path(__file__).parents[1]
TRAIN = [
    "--head",
    "mean_pool",
    "--folds",
    "2",
    "--epochs",
    "3",
    "--set",
    "head.options.embed_dim=8",
    "--set",
    "evaluation.bootstrap=0",
    "--set",
    "evaluation.report=false",
]


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output


def mil_csv(tmp_path: Path, n: int = 12, *, one_class: bool = False) -> Path:
    bags = make_bags(n, dim=4, max_n=6)
    if one_class:
        for b in bags:
            b.label = 0
    path = tmp_path / "bags.csv"
    write_mil_csv(path, bags)
    return path


def train(tmp_path: Path, out: Path, *extra: str, n: int = 12) -> tuple[int, str]:
    csv = tmp_path / "bags.csv"
    if not csv.exists():
        mil_csv(tmp_path, n)
    return invoke(
        "train", "--mil-csv", str(csv), "--output-path", str(out), *TRAIN, *extra
    )


# ---------------------------------------------------------------- 1. one writer


HOLDER = (
    "import sys, time\n"
    "from tiahnm.utils.lock import folder_lock\n"
    "with folder_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(120)\n"
)


def test_locked_folder_names_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, output = train(tmp_path, out)
        assert code == EXIT_LOCKED
        assert f"pid {holder.pid} on host" in output
        assert "in use by" in output
        assert not (out / "config.yaml").exists()  # nothing written by the loser
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"output_dir: {out}\ndata: {{source: mil_csv, options: {{path: "
            f"{tmp_path / 'bags.csv'}}}}}\n"
        )
        assert invoke("run", str(cfg))[0] == EXIT_LOCKED
        junk = tmp_path / "x.svs"  # never opened: the lock is taken first
        junk.write_bytes(b"junk")
        code, output = invoke("extract", str(junk), "--output-path", str(out))
        assert code == EXIT_LOCKED, output
        assert not (out / "stages.json").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the flock is gone
        holder.wait()
    assert json.loads((out / ".tiahnm.lock").read_text())["pid"] == holder.pid
    code, output = train(tmp_path, out)  # the stale lock is taken over
    assert code == 0, output
    assert (out / "summary.json").is_file()
    assert (out / ".tiahnm.lock").read_text() == ""  # released on a clean exit


def test_lock_is_reentrant_in_one_process(tmp_path):
    from tiahnm.utils.lock import folder_lock, read_holder

    with folder_lock(tmp_path), folder_lock(tmp_path / "." / ""):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert read_holder(tmp_path) is None


def test_resuming_a_checkpoint_of_other_settings_is_an_error_line(tmp_path):
    out = tmp_path / "run"
    code, _ = train(tmp_path, out, "--epochs", "1")
    assert code == 0
    # a last.pt of a mean_pool head, then the same fold resumed by an abmil head
    (out / "folds" / "r0_f0" / "result.json").unlink()
    from tiahnm.runtime.checkpoint import save_checkpoint

    head = MeanPoolingMIL(4, 2, embed_dim=8)
    save_checkpoint(
        {"round": 0, "head": head.state_dict(), "miner": {}, "optimizer": {}},
        out / "folds" / "r0_f0" / "last.pt",
    )
    code, output = invoke(
        "train",
        "--mil-csv",
        str(tmp_path / "bags.csv"),
        "--output-path",
        str(out),
        *TRAIN,
        "--head",
        "abmil",
    )
    assert code == EXIT_DATA
    assert "last.pt: this checkpoint was made by a run with other settings" in output


# ------------------------------------------------------- 2. no code from a config


@pytest.mark.parametrize(
    "target",
    [
        "module:subprocess:run",  # standard library: refused without importing
        "module:tiahnm.utils.io:write_json",  # a function: refused before calling
        "module:tests.slides.helpers:torch.save",
    ],
)
def test_module_encoder_never_calls_a_function(tmp_path, target):
    from tiahnm.encoders.build import build_encoder

    victim = tmp_path / "pwned"
    kwargs = {"args": ["touch", str(victim)], "path": str(victim), "obj": 1}
    with pytest.raises(ConfigError, match=r"nn\.Module|standard-library"):
        build_encoder(target, options={"kwargs": kwargs})
    assert not victim.exists()


def test_module_encoder_subprocess_from_a_run_config(tmp_path):
    from tests.slides.conftest import make_image, write_pyramid

    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid(slides / "s0.tif", make_image(seed=0))
    victim = tmp_path / "pwned"
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns0,0\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"extract: {{slides: [{slides}], encoder: 'module:subprocess:run', "
        f"encoder_options: {{kwargs: {{args: [touch, {victim}]}}}}}}\n"
        f"data: {{options: {{labels_csv: {labels}}}}}\n"
    )
    code, output = invoke("run", str(cfg), "--output-path", str(tmp_path / "o"))
    assert code == EXIT_USAGE
    assert "standard-library" in output
    assert not victim.exists()


# ---------------------------------------------------------------- 3. alias bombs

BOMB = """
    a: &a [x, x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
"""
OPTION_KEYS = [
    ("head", "options"),
    ("miner", "options"),
    ("data", "options"),
    ("extract", "encoder_options"),
]


@pytest.mark.parametrize(("section", "key"), OPTION_KEYS)
def test_alias_bomb_in_an_options_mapping_is_refused_at_load(tmp_path, section, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{section}:\n  {key}:{BOMB}")
    assert cfg.stat().st_size < 1024
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(cfg)
    assert time.perf_counter() - t0 < 1.0


def test_recursive_alias_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("losses:\n  - name: mirank\n    options: &o\n      self: *o\n")
    with pytest.raises(ConfigError, match="recursive YAML alias"):
        load_config(cfg)


def test_small_anchors_still_work(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "head: {name: abmil, options: &h {embed_dim: 16}}\n"
        "miner: {name: none, options: {}}\n"
        "losses: [{name: mirank, options: *h}]\n"
    )
    config = load_config(cfg)
    assert config.losses[0].options == {"embed_dim": 16}


# ------------------------------------------------------- 4. outside the data


def write_h5(path: Path, n: int = 3, d: int = 4, **kw) -> None:
    with h5py.File(path, "w") as f:
        f["features"] = np.ones((n, d), np.float32)
        for k, v in kw.items():
            f[k] = v


def folder(tmp_path: Path, rows: str) -> tuple[Path, Path]:
    feats = tmp_path / "feats"
    feats.mkdir(exist_ok=True)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + rows)
    return feats, labels


@pytest.mark.parametrize("sid", ["../outside", "/abs/outside", "sub/x", ".."])
def test_slide_ids_cannot_leave_the_features_folder(tmp_path, sid):
    from tiahnm.data.h5_features import H5FeatureFolder

    write_h5(tmp_path / "outside.h5")
    feats, labels = folder(tmp_path, f"ok,0\n{sid},1\n")
    write_h5(feats / "ok.h5")
    with pytest.raises(DataError, match="not a plain file name"):
        H5FeatureFolder(str(feats), str(labels)).load()


def test_external_link_and_external_storage_are_refused(tmp_path):
    from tiahnm.slides.store import read_feature_arrays

    write_h5(tmp_path / "elsewhere.h5")
    linked = tmp_path / "linked.h5"
    with h5py.File(linked, "w") as f:
        f["features"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "/features")
    with pytest.raises(DataError, match="ExternalLink"):
        read_feature_arrays(linked)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.ones((3, 4), np.float32).tobytes())
    ext = tmp_path / "ext.h5"
    with h5py.File(ext, "w") as f:
        f.create_dataset("features", (3, 4), "f4", external=[(str(raw), 0, 48)])
    with pytest.raises(DataError, match="external files"):
        read_feature_arrays(ext)
    soft = tmp_path / "soft.h5"
    with h5py.File(soft, "w") as f:
        f["data"] = np.ones((3, 4), np.float32)
        f["features"] = h5py.SoftLink("/data")
    with pytest.raises(DataError, match="SoftLink"):
        read_feature_arrays(soft)


def test_declared_size_is_checked_before_reading(tmp_path, monkeypatch):
    from tiahnm.data.h5_features import H5FeatureFolder
    from tiahnm.slides.store import read_feature_arrays

    huge = tmp_path / "huge.h5"
    with h5py.File(huge, "w") as f:  # 8 GiB declared, nothing written
        f.create_dataset("features", (2**20, 2**11), "f4", chunks=(1024, 64))
    assert huge.stat().st_size < 10_000
    with pytest.raises(DataError, match=r"8\.00 GiB\), over the limit"):
        read_feature_arrays(huge)
    # the limit is the user's: 48 bytes refused under a 40-byte limit, then raised
    feats, labels = folder(tmp_path, "a,0\n")
    write_h5(feats / "a.h5")
    with pytest.raises(DataError, match="max_bytes"):
        H5FeatureFolder(str(feats), str(labels), max_bytes=40).load()
    assert len(H5FeatureFolder(str(feats), str(labels), max_bytes=48).load()) == 1
    monkeypatch.setenv("TIAHNM_MAX_DATASET_BYTES", "40")
    with pytest.raises(DataError, match="over the limit"):
        H5FeatureFolder(str(feats), str(labels)).load()


# --------------------------------------------------- 5. OS errors: one Error line


def _raise_oserror(code: int):
    """Fail as the system call does: a path argument is named, a descriptor not."""

    def fail(*args, **kwargs):
        where = args[0] if args and isinstance(args[0], (str, Path)) else None
        raise OSError(code, os.strerror(code), where)

    return fail


def test_disk_full_while_saving_a_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def save_to_full_disk(obj, f, **kwargs):
        real_save(obj, "/dev/full", **kwargs)  # the real ENOSPC failure of torch

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr(torch, "save", save_to_full_disk)
    out = tmp_path / "run"
    code, output = train(tmp_path, out)
    assert code == EXIT_RESOURCE
    assert f"Error: {out / 'folds' / 'r0_f0' / 'last.pt'}: cannot write" in output
    assert "disk full" in output
    assert not list(out.rglob("*.tmp"))


def test_disk_full_while_writing_failures_csv(tmp_path, monkeypatch):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "bad.svs").write_bytes(os.urandom(2000))
    monkeypatch.setattr(os, "fsync", _raise_oserror(errno.ENOSPC))
    out = tmp_path / "feats"
    code, output = invoke(
        "extract", str(slides), "--output-path", str(out), "--patch-size", "64"
    )
    assert code == EXIT_RESOURCE, output
    assert f"Error: {out / 'failures.csv'}: no space left on the device" in output
    assert "[ENOSPC]" in output
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("code", "text"),
    [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")],
)
def test_read_only_output_folder(tmp_path, monkeypatch, code, text):
    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", _raise_oserror(code))
    status, output = train(tmp_path, tmp_path / "run")
    assert status == EXIT_RESOURCE
    assert text in output


def test_output_path_that_is_a_file(tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"output_dir: {out}\ndata: {{source: mil_csv, options: {{path: "
        f"{mil_csv(tmp_path)}}}}}\n"
    )
    code, output = invoke("run", str(cfg))
    assert code == EXIT_RESOURCE
    assert str(out) in output
    assert "exists and is not a folder" in output


def test_an_unexpected_exception_is_one_line(tmp_path, monkeypatch):
    import tiahnm.crossval as cv

    def boom(*a, **k):
        raise TypeError("unexpected")

    monkeypatch.setattr(cv, "make_folds", boom)
    code, output = train(tmp_path, tmp_path / "run")
    assert code == EXIT_INTERNAL
    assert "internal error (TypeError: unexpected)" in output
    assert "TIAHNM_TRACEBACK=1" in output


# ------------------------------------------------------------ non-finite loss


class NaNAfter(MeanPoolingMIL):
    """A head whose loss turns NaN after ``after`` calls (a diverging model)."""

    calls = 0
    after = 20

    def loss_terms(self, out):
        terms = super().loss_terms(out)
        if not self.training:  # validation and test stay finite
            return terms
        NaNAfter.calls += 1
        if NaNAfter.calls > NaNAfter.after:
            return [(w, logits * float("nan")) for w, logits in terms]
        return terms


class NaNPlugin:
    @hookimpl
    def tiahnm_register_heads(self, register):
        register("nan_head", NaNAfter)


def test_nan_loss_stops_the_fold_and_keeps_the_last_checkpoint(tmp_path):
    NaNAfter.calls = 0
    get_plugin_manager().register(NaNPlugin(), name="nan-plugin")
    out = tmp_path / "run"
    # 12 bags: 6 per training fold, minus one for validation -> 5 steps per epoch;
    # the 21st call is in epoch 4 (validation does not call loss during training)
    code, output = train(tmp_path, out, "--head", "nan_head", "--epochs", "10")
    assert code == EXIT_DATA
    assert "Error: fold r0_f0: epoch" in output
    assert "training loss is nan" in output
    assert "the last good checkpoint" in output
    last = torch.load(out / "folds" / "r0_f0" / "last.pt", weights_only=True)
    epoch = int(output.split("epoch ")[1].split(":")[0])
    assert last["epoch"] == epoch - 1
    assert all(torch.isfinite(v).all() for v in last["head"].values())


def test_nan_loss_can_skip_the_step_and_count_it(tmp_path):
    NaNAfter.calls = 0
    NaNAfter.after = 3
    get_plugin_manager().register(NaNPlugin(), name="nan-plugin")
    out = tmp_path / "run"
    try:
        code, output = train(
            tmp_path,
            out,
            "--head",
            "nan_head",
            "--set",
            "train.nonfinite=skip",
        )
    finally:
        NaNAfter.after = 20
    assert code == 0, output
    result = json.loads((out / "folds" / "r0_f0" / "result.json").read_text())
    skipped = [row["nonfinite_steps"] for row in result["history"]]
    assert sum(skipped) > 0
    assert all(np.isfinite(row["train_loss"]) for row in result["history"])
    # 4 steps an epoch; the loss is NaN from the 4th training call on (of the run):
    # fold 0 skips 1 step, then all 4, fold 1 all of them
    again = json.loads((out / "folds" / "r0_f1" / "result.json").read_text())
    assert skipped == [1, 4, 4]
    assert [row["nonfinite_steps"] for row in again["history"]] == [4, 4, 4]
    # a skipped step leaves the head alone: the validation loss stays where the
    # last finite step left it
    for history in (result["history"][1:], again["history"]):
        assert len({row["val_loss"] for row in history}) == 1


# ---------------------------------------------------------- damaged JSON files


def test_truncated_result_json_is_recomputed(tmp_path):
    out = tmp_path / "run"
    assert train(tmp_path, out)[0] == 0
    before = (out / "predictions.csv").read_text()
    result = out / "folds" / "r0_f1" / "result.json"
    result.write_text(result.read_text()[:100])
    code, output = train(tmp_path, out)
    assert code == 0, output
    assert (out / "predictions.csv").read_text() == before
    assert json.loads(result.read_text())["fold"] == 1
    assert (result.parent / "result.json.damaged").is_file()


def test_truncated_summary_json_is_recomputed_by_run_and_named_by_report(tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"output_dir: {out}\ndata: {{source: mil_csv, options: {{path: "
        f"{mil_csv(tmp_path)}}}}}\nhead: {{name: mean_pool, options: {{embed_dim: 8}}}}"
        "\ntrain: {epochs: 2}\ncv: {folds: 2}\nevaluation: {bootstrap: 0}\n"
    )
    assert invoke("run", str(cfg))[0] == 0
    summary = out / "summary.json"
    full = json.loads(summary.read_text())
    summary.write_text(summary.read_text()[:50])
    code, output = invoke("report", str(out))
    assert code == EXIT_DATA
    assert f"{summary}: damaged JSON" in output
    code, output = invoke("run", str(cfg))
    assert code == 0, output
    assert json.loads(summary.read_text())["metrics"] == full["metrics"]


# ----------------------------------------------------------------- plugins


def fake_dist(root: Path, name: str, module_code: dict[str, str], eps: str) -> None:
    """A distribution on ``root`` (added to PYTHONPATH) with ``tiahnm`` entry points."""
    for mod, code in module_code.items():
        (root / f"{mod}.py").write_text(code)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(f"[tiahnm]\n{eps}")


def test_plugins_that_exit_raise_or_clash_do_not_break_commands(tmp_path):
    fake_dist(
        tmp_path,
        "evil",
        {
            "exits_at_import": "import sys\nsys.exit(3)\n",
            "raising_hook": (
                "from tiahnm.hookspecs import hookimpl\n"
                "@hookimpl\ndef tiahnm_register_heads(register):\n"
                "    raise RuntimeError('hook broke')\n"
            ),
            "clashing": (
                "from tiahnm.hookspecs import hookimpl\n"
                "from tiahnm.heads.pooling import MeanPoolingMIL\n"
                "@hookimpl\ndef tiahnm_register_heads(register):\n"
                "    register('abmil', MeanPoolingMIL)\n"
            ),
        },
        "exits = exits_at_import\nraises = raising_hook\nclash = clashing\n",
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]),
        TIAHNM_NO_PROGRESS="1",
    )
    env.pop("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", None)
    res = subprocess.run(
        [sys.executable, "-m", "tiahnm", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "mean_pool" in res.stdout  # every other component is listed
    assert "'exits'" in res.stderr and "SystemExit: 3" in res.stderr
    assert "'raises'" in res.stderr and "hook broke" in res.stderr
    assert "Duplicate head name 'abmil'" in res.stderr
    assert "Traceback" not in res.stderr
    # the clashing name is refused where it is used, with both owners named
    res = subprocess.run(
        [sys.executable, "-m", "tiahnm", "train", "--mil-csv", "x.csv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert res.returncode == EXIT_USAGE
    assert "Error: Duplicate head name 'abmil'" in res.stderr
    assert "'clash' (evil)" in res.stderr


def test_register_hook_that_raises_is_isolated():
    class Broken:
        @hookimpl
        def tiahnm_register_miners(self, register):
            raise ValueError("bad plugin")

    pm = get_plugin_manager()
    pm.register(Broken(), name="broken")
    assert "mhim" in pm.get("miner")
    code, output = invoke("plugins")
    assert code == 0
    assert "FAILED to load plugin 'broken'" in output
    assert "ValueError: bad plugin" in output


# ------------------------------------------------------- validation before stages


def test_unknown_head_is_reported_before_extract(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "s.svs").write_bytes(b"never opened")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"extract: {{slides: [{slides}]}}\nhead: {{name: nope}}\n"
        f"miner: {{name: typo}}\ndata: {{options: {{labels_csv: x.csv}}}}\n"
    )
    t0 = time.perf_counter()
    code, output = invoke("run", str(cfg), "--output-path", str(tmp_path / "o"))
    assert code == EXIT_USAGE
    assert "Unknown head 'nope'" in output and "Unknown miner 'typo'" in output
    assert not (tmp_path / "o" / "features").exists()
    assert time.perf_counter() - t0 < 5


def test_bag_source_without_its_required_options(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: h5_folder, options: {labels_csv: l.csv}}\n")
    code, output = invoke("train", str(cfg), "--output-path", str(tmp_path / "o"))
    assert code == EXIT_USAGE
    assert "bag_source 'h5_folder' needs option(s) data.options.features_dir" in output
    from tiahnm.plugins import get_registry

    with pytest.raises(PluginError, match="needs option"):
        get_registry("bag_source").create("h5_folder", labels_csv="l.csv")


def test_init_then_run_on_the_unedited_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("init")[0] == 0
    code, output = invoke("run", "tiahnm.yaml")
    assert code == EXIT_USAGE
    assert "unedited `tiahnm init` template" in output
    assert "tiahnm run --demo" in output


def test_absurd_learning_rate_is_warned(tmp_path):
    code, output = train(tmp_path, tmp_path / "run", "--set", "train.lr=1e9")
    assert code == 0
    assert "Warning: train.lr=1e+09 is unusually large" in output


def test_exploding_loss_is_warned_during_training(caplog):
    from tiahnm.training.guards import watch_divergence

    rows = []
    callback = watch_divergence("r0_f0", rows.append)
    for epoch, loss in enumerate([0.7, 5.0, 1e4, 1e21]):
        callback({"epoch": epoch, "train_loss": loss})
    assert len(rows) == 4
    warnings = [r.message for r in caplog.records if "diverging" in r.message]
    assert len(warnings) == 1
    assert "epoch 2" in warnings[0]


# --------------------------------------------------------- claims that hold


def test_too_many_folds_exits_2(tmp_path):
    code, output = train(tmp_path, tmp_path / "run", "--folds", "9")
    assert code == EXIT_USAGE
    assert "cv.folds=9 but the smallest class has only 6 bags" in output


def test_single_class_labels_are_an_error(tmp_path):
    mil_csv(tmp_path, one_class=True)
    code, output = train(tmp_path, tmp_path / "run")
    assert code == EXIT_DATA
    assert "training needs at least two classes" in output


def test_split_column_without_val_rows_is_reported_truthfully(tmp_path):
    rows = "".join(f"s{i},{i % 2},{'test' if i >= 8 else 'train'}\n" for i in range(12))
    feats, labels = folder(tmp_path, "")
    labels.write_text("slide_id,label,split\n" + rows)
    rng = np.random.default_rng(0)
    for i in range(12):
        with h5py.File(feats / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(4, 4)).astype(np.float32)
    out = tmp_path / "run"
    code, output = invoke(
        "train",
        "--features-dir",
        str(feats),
        "--labels-csv",
        str(labels),
        "--output-path",
        str(out),
        *TRAIN[:-2],
    )
    assert code == 0, output
    report = (out / "report.md").read_text()
    assert "**No validation bags** in 1 of 1 folds" in report
    assert "chosen on each fold's validation bags" not in report


def test_long_slide_names_fit_their_temporary_files(tmp_path):
    from tiahnm.slides.store import write_feature_file

    sid = "s" * 250  # the final name (253 bytes) fits in 255; ".name.XXXXXXXX.tmp" not
    path = tmp_path / f"{sid}.h5"
    write_feature_file(
        path,
        features=np.ones((2, 3), np.float32),
        coords=np.zeros((2, 2), np.int64),
        attrs={"slide_id": sid},
    )
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_mixed_run_folder_is_not_an_ensemble(tmp_path):
    import shutil

    from tiahnm.evaluation.predict import load_heads

    a, b = tmp_path / "a", tmp_path / "b"
    assert train(tmp_path, a, "--epochs", "1")[0] == 0
    assert train(tmp_path, b, "--epochs", "1", "--head", "abmil")[0] == 0
    assert len(load_heads(a, torch.device("cpu"))) == 2  # one run: an ensemble
    shutil.rmtree(a / "folds" / "r0_f1")
    shutil.copytree(b / "folds" / "r0_f1", a / "folds" / "r0_f1")
    with pytest.raises(DataError, match="come from different runs"):
        load_heads(a, torch.device("cpu"))


def test_malformed_scores_file_is_named_by_heatmap(tmp_path):
    bad = tmp_path / "instance_scores.h5"
    with h5py.File(bad, "w") as f:
        g = f.create_group("s0")
        g["scores"] = np.ones(3, np.float32)
        g["coords"] = np.zeros((3, 2), np.int64)
        g.attrs["slide_id"] = "s0"
        g.attrs["patch_size_level0"] = 0
    code, output = invoke("heatmap", str(bad), "--output-path", str(tmp_path / "h"))
    assert code == EXIT_DATA
    assert f"{bad}: slide 's0': malformed instance scores" in output
    assert "patch_size_level0=0" in output


def test_extract_stores_absolute_slide_paths(tmp_path, monkeypatch):
    from tests.slides.conftest import make_image, write_pyramid

    (tmp_path / "slides").mkdir()
    write_pyramid(tmp_path / "slides" / "s0.tif", make_image(seed=0))
    monkeypatch.chdir(tmp_path)
    code, output = invoke(
        "extract", "slides", "--output-path", "feats", "--patch-size", "64"
    )
    assert code == 0, output
    with h5py.File(tmp_path / "feats" / "s0.h5") as f:
        stored = f.attrs["slide_path"]
    assert Path(stored).is_absolute()
    assert Path(stored) == tmp_path / "slides" / "s0.tif"


def test_truncated_tiff_that_would_decode_to_grey_is_refused(tmp_path):
    from tests.slides.conftest import make_image, write_pyramid
    from tiahnm.slides.reader import open_slide

    path = write_pyramid(tmp_path / "s.tif", make_image(), levels=1)
    open_slide(path).close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the later tiles cut off
    with pytest.raises(DataError, match="truncated slide file: page 0"):
        open_slide(path)


def test_a_hook_that_raises_midway_registers_nothing():
    class Half:
        @hookimpl
        def tiahnm_register_heads(self, register):
            register("half_head", MeanPoolingMIL)
            raise RuntimeError("after the first")

    pm = get_plugin_manager()
    pm.register(Half(), name="half")
    assert "half_head" not in pm.get("head")
    assert "abmil" in pm.get("head")
    assert [f.name for f in pm.failures] == ["half"]
