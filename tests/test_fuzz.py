"""Fuzz tests: random and corrupt inputs raise only documented tiahnm errors.

The config loader, the HDF5 feature reader (with its labels CSV) and the MIL CSV
reader are fed random YAML, random/corrupt HDF5 files and random CSV text. Anything
other than the error types listed in ``docs/reliability.md`` escaping is a bug.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiahnm.config import Config, iter_schema, load_config
from tiahnm.data.h5_features import H5FeatureFolder
from tiahnm.data.mil_csv import MILCSVSource
from tiahnm.errors import ConfigError, DataError
from tiahnm.slides.store import read_feature_arrays

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEYS = [key for key, *_ in iter_schema()]
LEAF_NAMES = sorted({k.rsplit(".", 1)[-1] for k in KEYS} | {"options", "name"})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["0.5", "youden", "adam", "cosine", "1e-4", "auto", "abmil"]),
)
key_names = st.one_of(st.sampled_from(LEAF_NAMES), st.text(max_size=6))
yaml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(key_names, inner, max_size=4),
    ),
    max_leaves=12,
)
# documents shaped like configs: known sections with random contents
sections = st.sampled_from(
    ["data", "head", "miner", "train", "cv", "evaluation", "extract"]
)
config_docs = st.dictionaries(
    st.one_of(sections, st.sampled_from(LEAF_NAMES), st.text(max_size=5)),
    yaml_values,
    max_size=5,
)
yaml_snippets = st.sampled_from(
    [
        "!!python/object:os.system {}",
        "2001-13-45",
        "!!int abc",
        "!!float x",
        "!!binary ~~~",
        "&a [*a]",
        "{a: 1, a: 2}",
        "? [1, 2]\n: 3",
        "!!set {a, b}",
        "2020-01-01",
        "[1, 2",
        "'unterminated",
        "\x00\x01",
        "~",
        ".nan",
        "-.inf",
        "0x1F",
        "1_000",
        "!!timestamp nope",
    ]
)


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


@FUZZ
@given(doc=config_docs)
def test_load_config_random_documents(doc):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "c.yaml", yaml.safe_dump(doc).encode())
        try:
            config = load_config(path)
        except ConfigError as exc:
            assert "c.yaml" in str(exc)
        else:
            assert isinstance(config, Config)


@FUZZ
@given(
    text=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200),
        st.lists(yaml_snippets, min_size=1, max_size=3).map(
            lambda parts: "train:\n  lr: " + "\n".join(parts)
        ),
        yaml_snippets,
    )
)
def test_load_config_random_bytes(text):
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "c.yaml", data)
        try:
            load_config(path)
        except ConfigError as exc:
            assert "c.yaml" in str(exc)


@FUZZ
@given(
    overrides=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=8)),
            st.one_of(yaml_snippets, st.text(max_size=10)),
            st.sampled_from(["=", "", "=="]),
        ).map(lambda t: f"{t[0]}{t[2]}{t[1]}"),
        max_size=4,
    )
)
def test_load_config_random_overrides(overrides):
    try:
        load_config(None, overrides)
    except ConfigError as exc:
        assert str(exc)


# --- HDF5 feature files ------------------------------------------------------------

dtypes = st.sampled_from(
    ["float32", "float64", "float16", "int8", "int64", "uint8", "bool", "S4", "O"]
)
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e30, -1.0])


@st.composite
def arrays(draw):
    shape = draw(shapes)
    dtype = draw(dtypes)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(size=shape) * 3
    if values.size and draw(st.booleans()):
        values.flat[draw(st.integers(0, values.size - 1))] = draw(special)
    if dtype == "O":
        return np.array([str(v) for v in values.reshape(-1)], dtype=object).reshape(
            shape
        )
    if dtype == "S4":
        return values.astype(str).astype("S4")
    with np.errstate(invalid="ignore", over="ignore"):
        return values.astype(dtype)


@st.composite
def h5_layouts(draw):
    """``{name: array | "group" | "empty" | "scalar"}`` for a random HDF5 file."""
    names = draw(
        st.lists(
            st.sampled_from(["features", "coords", "instance_labels", "other"]),
            unique=True,
            max_size=4,
        )
    )
    kinds = st.one_of(
        arrays(), st.sampled_from(["group", "empty", "scalar", "compound"])
    )
    return {name: draw(kinds) for name in names}


def write_h5(path: Path, layout: dict) -> None:
    with h5py.File(path, "w") as f:
        for name, item in layout.items():
            if isinstance(item, np.ndarray):
                if item.dtype == object:
                    f.create_dataset(
                        name, data=item, dtype=h5py.string_dtype()
                    )  # vlen strings
                else:
                    f[name] = item
            elif item == "group":
                f.create_group(name)
            elif item == "empty":
                f.create_dataset(name, data=h5py.Empty("f4"))
            elif item == "scalar":
                f[name] = 3.0
            else:
                rec = np.zeros(3, dtype=[("a", "f4"), ("b", "i4")])
                f[name] = rec


def _read_only_documented(path: Path) -> None:
    try:
        arrays_ = read_feature_arrays(path)
    except DataError as exc:
        assert path.name in str(exc)
    else:
        feats = arrays_.features
        assert feats.ndim == 2 and feats.shape[0] > 0 and feats.shape[1] > 0
        assert feats.dtype == np.float32 and np.isfinite(feats).all()
        if arrays_.instance_labels is not None:
            assert arrays_.instance_labels.shape == (feats.shape[0],)


@FUZZ
@given(layout=h5_layouts())
def test_feature_reader_random_layouts(layout):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.h5"
        write_h5(path, layout)
        _read_only_documented(path)


@FUZZ
@given(
    n=st.integers(1, 6),
    d=st.integers(1, 5),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_feature_reader_truncated_and_flipped_bytes(n, d, cut, flips):
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good.h5"
        write_h5(
            good,
            {
                "features": np.ones((n, d), np.float32),
                "coords": np.zeros((n, 2), np.int64),
            },
        )
        data = bytearray(good.read_bytes())
        for pos in flips:
            data[pos % len(data)] ^= 0xFF
        data = data[: int(len(data) * cut)] if cut < 1.0 else data
        path = _write(Path(tmp), "bad.h5", bytes(data))
        _read_only_documented(path)


csv_cells = st.one_of(
    st.sampled_from(
        ["0", "1", "2", "-1", "1.5", "nan", "inf", "1e999", "", " ", "x", "²", "٣"]
    ),
    st.text(max_size=5),
    st.integers(-5, 10**12).map(str),
)
csv_texts = st.lists(
    st.lists(csv_cells, min_size=0, max_size=5).map(",".join), max_size=6
).map("\n".join)


@FUZZ
@given(
    labels=csv_texts,
    header=st.sampled_from(
        ["slide_id,label", "slide_id,label,split", "id,label", "", "label,slide_id"]
    ),
    raw=st.one_of(st.none(), st.binary(max_size=40)),
    layouts=st.lists(h5_layouts(), max_size=2),
)
def test_h5_folder_random_labels_and_files(labels, header, raw, layouts):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        feats = root / "feats"
        feats.mkdir()
        data = raw if raw is not None else (header + "\n" + labels).encode()
        csv = _write(root, "labels.csv", data)
        for name, layout in zip(["0", "1"], layouts, strict=False):
            write_h5(feats / f"{name}.h5", layout)
        try:
            bags = H5FeatureFolder(str(feats), str(csv), missing="skip").load()
        except DataError as exc:
            assert "labels.csv" in str(exc) or ".h5" in str(exc) or "feats" in str(exc)
        else:
            assert bags and all(b.features.shape[0] > 0 for b in bags)


@FUZZ
@given(
    text=st.one_of(csv_texts, st.binary(max_size=120)),
    header=st.booleans(),
    inst=st.sampled_from([None, 2, 3, 9]),
)
def test_mil_csv_random_text(text, header, inst):
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "bags.csv", data)
        try:
            bags = MILCSVSource(
                str(path), header=header, instance_label_column=inst
            ).load()
        except DataError as exc:
            assert "bags.csv" in str(exc)
        else:
            for bag in bags:
                assert bag.slide_id
                assert bag.features.ndim == 2 and bag.features.shape[1] > 0
                assert bool(np.isfinite(bag.features.numpy()).all())
