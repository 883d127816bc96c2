"""One table of bad inputs: each raises a documented error naming the file and row/key.

Every case builds a small bad input in ``tmp_path`` and gives the Python call that
reads it and, where a command reads it, the CLI arguments. The test asserts the error
type, that the message names the file (and row or key), and the CLI exit code
(``docs/reliability.md`` lists the same table). Slide failures inside ``tiahnm
extract`` are isolated per slide: the command goes on and exits 3.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tests.slides.conftest import make_image, write_pyramid
from tiahnm.cli import cli
from tiahnm.config import load_config
from tiahnm.data.h5_features import H5FeatureFolder
from tiahnm.data.mil_csv import MILCSVSource
from tiahnm.errors import ConfigError, DataError, PluginError
from tiahnm.plugins import get_registry
from tiahnm.slides.reader import find_slides

EXTRACT = ["--resolution", "2.0", "--patch-size", "64", "--num-workers", "0"]


@dataclass
class Case:
    """A bad input: how to make it, what reads it, what must come out."""

    make: Callable[[Path], tuple[Callable[[], object], list[str] | None]]
    error: type[Exception]
    message: str  # regex; must match the Python error and the CLI output
    exit_code: int | None = None
    failures_csv: bool = field(default=False)  # extract: listed in failures.csv


# --- builders ------------------------------------------------------------------


def _slide(tmp: Path, name: str = "s.tif", image=None, **kw) -> Path:
    folder = tmp / "slides"
    folder.mkdir(exist_ok=True)
    return write_pyramid(
        folder / name, make_image()[::2, ::2].copy() if image is None else image, **kw
    )


def _extract_call(path: Path, tmp: Path, **tiling) -> Callable[[], object]:
    def call():
        from tiahnm.slides.extract import ExtractConfig, Extractor
        from tiahnm.slides.tiling import TilingConfig

        opts = {"resolution": 2.0, "patch_size": 64, **tiling}
        cfg = ExtractConfig(tiling=TilingConfig(**opts), num_workers=0)
        return Extractor(cfg, tmp / "py_out").process(path)

    return call


def _extract_cli(path: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "extract",
        str(path),
        "--output-path",
        str(tmp / "cli_out"),
        *EXTRACT,
        *extra,
    ]


def slide_case(build: Callable[[Path], Path], *extra: str, **tiling):
    def make(tmp):
        path = build(tmp)
        return _extract_call(path, tmp, **tiling), _extract_cli(path, tmp, *extra)

    return make


def corrupt_slide(tmp):
    path = tmp / "slides" / "corrupt.svs"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(np.random.default_rng(0).bytes(20_000))
    return path


def truncated_slide(tmp):
    good = _slide(tmp, "good.tif")
    cut = good.with_name("cut.tif")
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    good.unlink()
    return cut


def h5(path: Path, feats=None, n=4, d=4, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if feats is None:
            feats = np.random.default_rng(len(path.name)).normal(size=(n, d))
        f["features"] = np.asarray(feats, dtype=np.float32)
        for key, value in extra.items():
            f[key] = value
    return path


def feature_case(
    labels: str | bytes, files: dict[str, Callable[[Path], object]], **options
):
    """A features folder + labels.csv read by H5FeatureFolder and `tiahnm train`."""

    def make(tmp):
        feats = tmp / "feats"
        feats.mkdir()
        for sid, writer in files.items():
            writer(feats / f"{sid}.h5")
        csv_path = tmp / "labels.csv"
        csv_path.write_bytes(labels if isinstance(labels, bytes) else labels.encode())

        def call():
            return H5FeatureFolder(str(feats), str(csv_path), **options).load()

        args = ["train", "--features-dir", str(feats), "--labels-csv", str(csv_path)]
        for key, value in options.items():
            args += ["--set", f"data.options.{key}={value}"]
        args += ["--set", "train.epochs=1", "--output-path", str(tmp / "run")]
        return call, args

    return make


def good_h5(path):
    return h5(path)


def mil_case(text: str):
    def make(tmp):
        path = tmp / "bags.csv"
        path.write_text(text)
        args = ["train", "--mil-csv", str(path), "--epochs", "1"]
        return MILCSVSource(str(path)).load, [
            *args,
            "--output-path",
            str(tmp / "run"),
        ]

    return make


def config_case(text: str, *overrides: str):
    def make(tmp):
        path = tmp / "c.yaml"
        path.write_text(text)
        args = ["run", str(path)]
        for item in overrides:
            args += ["--set", item]
        return (lambda: load_config(path, list(overrides))), args

    return make


def plugin_case(kind: str, cli_flag: list[str]):
    def make(tmp):
        csv_path = tmp / "bags.csv"
        csv_path.write_text("".join(f"{i % 2},b{i},{i}.0\n" for i in range(8)))
        args = ["train", "--mil-csv", str(csv_path), "--folds", "2", *cli_flag]
        args += ["--output-path", str(tmp / "run")]
        return (lambda: get_registry(kind).create("nope")), args

    return make


def encoder_case(tmp):
    path = _slide(tmp)
    return (
        lambda: get_registry("encoder").create("nope"),
        _extract_cli(path, tmp, "--encoder", "nope"),
    )


CASES = {
    # slides: isolated per slide by `tiahnm extract` (exit 3, failures.csv)
    "unreadable slide": Case(
        slide_case(corrupt_slide),
        DataError,
        r"corrupt\.svs: cannot open as a slide",
        3,
        True,
    ),
    "truncated slide": Case(
        slide_case(truncated_slide),
        DataError,
        r"cut\.tif: truncated slide file: page 0's image data ends at byte \d+ but "
        r"the file has \d+ bytes",
        3,
        True,
    ),
    "slide without mpp": Case(
        slide_case(lambda t: _slide(t, "nompp.tif", mpp=None)),
        DataError,
        r"nompp\.tif: no resolution metadata .*--mpp",
        3,
        True,
    ),
    "no tissue found": Case(
        slide_case(
            lambda t: _slide(t, "blank.tif", np.full((512, 512, 3), 240, np.uint8))
        ),
        DataError,
        r"blank\.tif: no patches with tissue fraction >= 0\.5 \(masker otsu",
        3,
        True,
    ),
    "patch larger than slide": Case(
        slide_case(lambda t: _slide(t), "--patch-size", "512", patch_size=512),
        DataError,
        r"s\.tif: patch size 512 px is larger than the slide \(128 x 128 px at 2\.0 mpp\)",
        3,
        True,
    ),
    "slide path missing": Case(
        lambda t: (
            lambda: find_slides([t / "gone.svs"]),
            _extract_cli(t / "gone.svs", t),
        ),
        DataError,
        r"gone\.svs: no such file or folder",
        1,
    ),
    # labels CSV
    "labels: slide without feature file": Case(
        feature_case("slide_id,label\na,0\nc,1\n", {"a": good_h5}),
        DataError,
        r"labels\.csv: slide 'c' has no feature file .*c\.h5",
        1,
    ),
    "labels: duplicate id": Case(
        feature_case("slide_id,label\na,0\na,1\n", {"a": good_h5}),
        DataError,
        r"labels\.csv, row 3: duplicate slide_id 'a'",
        1,
    ),
    "labels: label outside classes": Case(
        feature_case(
            "slide_id,label\na,neg\nb,maybe\n",
            {"a": good_h5, "b": good_h5},
            classes=["neg", "pos"],
        ),
        DataError,
        r"labels\.csv: label 'maybe' of slide 'b' is not one of the classes",
        1,
    ),
    "labels: missing label": Case(
        feature_case("slide_id,label\na,\n", {"a": good_h5}),
        DataError,
        r"labels\.csv, row 2: missing label for 'a'",
        1,
    ),
    "labels: missing column": Case(
        feature_case("slide,label\na,0\n", {"a": good_h5}),
        DataError,
        r"labels\.csv: missing column 'slide_id'",
        1,
    ),
    "labels: huge integer label": Case(
        feature_case("slide_id,label\na,0\nb,99999999\n", {"a": good_h5, "b": good_h5}),
        DataError,
        r"labels\.csv: integer label 99999999 would mean 100000000 classes",
        1,
    ),
    "labels: not UTF-8": Case(
        feature_case(b"slide_id,label\na,\xff\n", {"a": good_h5}),
        DataError,
        r"labels\.csv: not a UTF-8 text CSV",
        1,
    ),
    # feature files
    "features: wrong width": Case(
        feature_case(
            "slide_id,label\na,0\nb,1\n",
            {"a": good_h5, "b": lambda p: h5(p, d=7)},
        ),
        DataError,
        r"mix feature widths \(4: 1 file\(s\) .*a\.h5; 7: 1 file\(s\) .*b\.h5\)",
        1,
    ),
    "features: NaN": Case(
        feature_case("slide_id,label\na,0\n", {"a": lambda p: h5(p, [[1.0, np.nan]])}),
        DataError,
        r"a\.h5: 'features' contains NaN or infinite values",
        1,
    ),
    "features: empty bag": Case(
        feature_case("slide_id,label\na,0\n", {"a": lambda p: h5(p, np.zeros((0, 4)))}),
        DataError,
        r"a\.h5: empty bag \(0 instances\)",
        1,
    ),
    "features: zero width": Case(
        feature_case("slide_id,label\na,0\n", {"a": lambda p: h5(p, np.zeros((3, 0)))}),
        DataError,
        r"a\.h5: 'features' has width 0",
        1,
    ),
    "features: not HDF5": Case(
        feature_case("slide_id,label\na,0\n", {"a": lambda p: p.write_bytes(b"nope")}),
        DataError,
        r"a\.h5: unreadable HDF5 feature file",
        1,
    ),
    "features: missing dataset": Case(
        feature_case(
            "slide_id,label\na,0\n",
            {"a": lambda p: h5py.File(p, "w").create_group("feats").file.close()},
        ),
        DataError,
        r"a\.h5: no 'features' dataset \(keys: feats\)",
        1,
    ),
    "features: strings": Case(
        feature_case(
            "slide_id,label\na,0\n",
            {
                "a": lambda p: (
                    h5py.File(p, "w")
                    .create_dataset("features", data=[b"x"])
                    .file.close()
                )
            },
        ),
        DataError,
        r"a\.h5: 'features' has non-numeric type",
        1,
    ),
    "features: coords mismatch": Case(
        feature_case(
            "slide_id,label\na,0\n", {"a": lambda p: h5(p, coords=np.zeros((2, 2)))}
        ),
        DataError,
        r"a\.h5: 'coords' shape \(2, 2\) does not match 4 instances",
        1,
    ),
    # classic MIL CSV
    "mil csv: ragged row": Case(
        mil_case("0,a,1,2\n1,b,3\n"),
        DataError,
        r"bags\.csv, row 2: 1 features, expected 2 as on the first row",
        1,
    ),
    "mil csv: infinite value": Case(
        mil_case("0,a,1,inf\n"),
        DataError,
        r"bags\.csv, row 1: NaN or infinite feature value",
        1,
    ),
    "mil csv: non-integer label": Case(
        mil_case("0.5,a,1,2\n"),
        DataError,
        r"bags\.csv, row 1: label '0\.5' is not an integer",
        1,
    ),
    "mil csv: empty bag id": Case(
        mil_case("0, ,1,2\n"),
        DataError,
        r"bags\.csv, row 1: empty bag id",
        1,
    ),
    # config
    "config: unknown key": Case(
        config_case("train:\n  epoch: 3\n"),
        ConfigError,
        r"c\.yaml: Unknown config key 'train\.epoch'",
        2,
    ),
    "config: wrong type": Case(
        config_case("train:\n  epochs: ten\n"),
        ConfigError,
        r"c\.yaml: train\.epochs: expected int, got str 'ten'",
        2,
    ),
    "config: bad literal": Case(
        config_case("train:\n  optimizer: adagrad\n"),
        ConfigError,
        r"c\.yaml: train\.optimizer: 'adagrad' is not one of 'adam', 'adamw', 'sgd'",
        2,
    ),
    "config: out of range": Case(
        config_case("cv:\n  folds: 1\n"),
        ConfigError,
        r"c\.yaml: cv\.folds must be >= 2",
        2,
    ),
    "config: bad YAML tag": Case(
        config_case("train:\n  epochs: !!int x\n"),
        ConfigError,
        r"c\.yaml: not valid YAML",
        2,
    ),
    "config: top level not a mapping": Case(
        config_case("- 1\n- 2\n"),
        ConfigError,
        r"c\.yaml: the top level must be a mapping, got list",
        2,
    ),
    "config: override wrong type": Case(
        config_case("{}\n", "cv.repeats=many"),
        ConfigError,
        r"c\.yaml: cv\.repeats: expected int, got str 'many'",
        2,
    ),
    # plugin names
    "plugin: unknown head": Case(
        plugin_case("head", ["--head", "nope"]),
        PluginError,
        r"'nope'",
        2,
    ),
    "plugin: unknown miner": Case(
        plugin_case("miner", ["--miner", "nope"]),
        PluginError,
        r"'nope'",
        2,
    ),
    "plugin: unknown bag source": Case(
        plugin_case("bag_source", ["--set", "data.source=nope"]),
        PluginError,
        r"'nope'",
        2,
    ),
    "plugin: unknown encoder": Case(encoder_case, PluginError, r"'nope'", 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path):
    case = CASES[name]
    call, args = case.make(tmp_path)
    with pytest.raises(case.error) as info:
        call()
    message = str(info.value)
    assert re.search(case.message, message), message
    if args is None or case.exit_code is None:
        return
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == case.exit_code, res.output
    assert re.search(case.message, res.output), res.output
    assert "Traceback" not in res.output
    if case.failures_csv:
        with (tmp_path / "cli_out" / "failures.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 1 and re.search(case.message, rows[0]["error"])
        assert not list((tmp_path / "cli_out").glob("*.h5"))


def test_real_slide_without_mpp_and_truncated_real_slide(shared_data, tmp_path):
    from tiahnm.slides.reader import open_slide

    nompp = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(DataError, match=r"tcga-cr-7395-01a-01-ts1\.svs: no resolution"):
        open_slide(nompp)
    real = (shared_data / "slides" / "CMU-1-Small-Region.svs").read_bytes()
    cut = tmp_path / "cmu_cut.svs"
    cut.write_bytes(real[: len(real) // 2])
    with pytest.raises(DataError, match=r"cmu_cut\.svs: cannot open as a slide"):
        open_slide(cut)
