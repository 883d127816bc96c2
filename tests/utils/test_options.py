"""The typed options mechanism (tiahnm/utils/options.py) and its use by the registries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from tiahnm.errors import ConfigError, PluginError
from tiahnm.hookspecs import hookimpl
from tiahnm.miners.hnm import HNMMiner, HNMOptions
from tiahnm.miners.li2019 import Li2019Miner, Li2019Options
from tiahnm.miners.mhim import DEFAULTS, PRESETS, MHIMMiner, MHIMOptions
from tiahnm.plugins import KINDS, PluginManager, get_registry
from tiahnm.utils.options import (
    REQUIRED,
    Options,
    OptionSpec,
    coerce,
    defaults,
    markdown_table,
    option,
    parse,
    signature_spec,
    spec_of,
)

KEY = "miner.options"


@dataclass(frozen=True)
class Demo(Options):
    """Options of a made-up component."""

    k: int = option(8, low=1, help="Instances pooled.")
    ratio: float = option(0.5, low=0, high=1, open_low=True, help="A fraction.")
    rate: float = option(0.1, low=0, open_low=True, help="Positive.")
    mode: str = option("mean", choices=("mean", "max"), help="Pooling.")
    flag: bool = option(default=False, help="A switch.")
    where: Path | None = option(None, help="A path.")
    kind: Literal["a", "b"] = option("a", help="A literal.")
    sizes: list[int] = option([1, 2], help="A list.")
    shape: tuple[int, int] | None = option(None, help="A pair.")
    limit: int | None = option(None, low=0, help="Optional count.")


@dataclass(frozen=True)
class NeedsPath:
    path: str = option(help="Required.")
    n: int = option(1, low=1)


# ------------------------------------------------------------------ coercion
@pytest.mark.parametrize(
    ("tp", "value", "expected"),
    [
        (int, 3, 3),
        (float, 3, 3.0),
        (float, 0.25, 0.25),
        (bool, True, True),
        (str, "x", "x"),
        (Path, "a/b", Path("a/b")),
        (int | None, None, None),
        (int | None, 4, 4),
        (Literal["a", "b"], "b", "b"),
        (Literal["0.5", "youden"], 0.5, "0.5"),
        (list[int], [1, 2], [1, 2]),
        (list[float], [1, 2.5], [1.0, 2.5]),
        (tuple[int, ...], [1, 2, 3], (1, 2, 3)),
        (tuple[int, str], [1, "x"], (1, "x")),
        (dict[str, Any], {1: "a"}, {"1": "a"}),
        (Any, object, object),
    ],
)
def test_coercion_table(tp, value, expected):
    out = coerce(value, tp, "k")
    assert out == expected
    assert type(out) is type(expected)


@pytest.mark.parametrize(
    ("tp", "value", "message"),
    [
        (int, True, "k: expected int, got bool True."),
        (int, 2.5, "k: expected int, got float 2.5."),
        (int, "3", "k: expected int, got str '3'."),
        (float, "fast", "k: expected float, got str 'fast'."),
        (float, "1e-3", "k: expected float, got str '1e-3'."),
        (bool, "yes", "k: expected bool, got str 'yes'."),
        (str, 1, "k: expected str, got int 1."),
        (int | None, "x", "k: expected int or null, got str 'x'."),
        (Literal["a", "b"], "c", "k: 'c' is not one of 'a', 'b'."),
        (list[int], [1, "x"], "k[1]: expected int, got str 'x'."),
        (tuple[int, int], [1], "k: expected 2 items, got 1."),
        (dict[str, Any], [1], "k: expected dict, got list [1]."),
    ],
)
def test_coercion_errors_name_the_key(tp, value, message):
    with pytest.raises(ConfigError) as info:
        coerce(value, tp, "k")
    assert str(info.value) == message


def test_numeric_strings_only_when_asked():
    # The run config reads YAML 1.1's "1e-4" (a string) as a float; component options
    # keep rejecting it, as the hand-written miner checks did.
    assert coerce("1e-4", float, "k", numeric_strings=True) == pytest.approx(1e-4)
    with pytest.raises(ConfigError):
        parse(Li2019Options, {"oof_lr": "1e-3"}, key=KEY)


# ------------------------------------------------------------------ parse
def test_parse_fills_defaults_and_coerces():
    opts = parse(Demo, {"k": 3, "ratio": 1, "where": "out/x", "shape": [2, 3]}, key=KEY)
    assert opts == Demo(k=3, ratio=1.0, where=Path("out/x"), shape=(2, 3))
    assert isinstance(opts.ratio, float)
    assert parse(Demo, None, key=KEY) == Demo()
    # Mutable defaults are fresh copies.
    assert parse(Demo, {}, key=KEY).sizes is not Demo().sizes


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 0}, "miner.options.k: expected an integer >= 1, got 0."),
        ({"k": 2.0}, "miner.options.k: expected an integer >= 1, got 2.0."),
        ({"k": True}, "miner.options.k: expected an integer >= 1, got True."),
        ({"ratio": 0}, "miner.options.ratio: expected a number in (0, 1], got 0."),
        ({"ratio": 1.5}, "miner.options.ratio: expected a number in (0, 1], got 1.5."),
        ({"ratio": float("nan")}, "miner.options.ratio: expected a number in (0, 1]"),
        ({"rate": 0.0}, "miner.options.rate: expected a number > 0, got 0.0."),
        ({"rate": float("inf")}, "miner.options.rate: expected a number > 0, got inf."),
        ({"mode": "sum"}, "miner.options.mode: expected one of mean, max, got 'sum'."),
        ({"flag": "yes"}, "miner.options.flag: expected true or false, got 'yes'."),
        ({"where": 3}, "miner.options.where: expected a path or null, got 3."),
        ({"kind": "c"}, "miner.options.kind: expected one of 'a', 'b', got 'c'."),
        ({"sizes": [1, "x"]}, "miner.options.sizes: expected a list of an integer"),
        (
            {"limit": -1},
            "miner.options.limit: expected an integer >= 0 or null, got -1.",
        ),
    ],
)
def test_bad_values_name_the_full_key(options, message):
    with pytest.raises(ConfigError) as info:
        parse(Demo, options, key=KEY)
    assert str(info.value).startswith(message)


def test_bounds_are_inclusive_unless_open():
    assert parse(Demo, {"ratio": 1.0, "k": 1, "limit": 0}, key=KEY).ratio == 1.0
    with pytest.raises(ConfigError):
        parse(Demo, {"ratio": 0.0}, key=KEY)


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        parse(Demo, {"kk": 1}, key="head.options")
    assert str(info.value) == (
        "Unknown option head.options.kk. Accepted options: k, ratio, rate, mode, flag, "
        "where, kind, sizes, shape, limit."
    )


def test_required_option_is_a_plugin_error_naming_the_key():
    with pytest.raises(PluginError, match=r"needs option\(s\) data\.options\.path"):
        parse(NeedsPath, {"n": 2}, key="data.options")
    assert parse(NeedsPath, {"path": "x"}, key="data.options") == NeedsPath("x", 1)
    spec = spec_of(NeedsPath)
    assert spec.fields[0].required and spec.fields[0].default is REQUIRED


def test_defaults_and_docs_come_from_the_class():
    assert defaults(Demo) == {
        f.name: getattr(Demo(), f.name) for f in dataclasses.fields(Demo)
    }
    rows = markdown_table(spec_of(Demo))
    assert rows[:2] == ["| option | type | default | meaning |", "|---|---|---|---|"]
    assert "| `k` | an integer >= 1 | `8` | Instances pooled. |" in rows
    assert "| `mode` | one of mean, max | `mean` | Pooling. |" in rows
    assert "| `where` | a path or null | `null` | A path. |" in rows
    assert "| `kind` | one of 'a', 'b' | `a` | A literal. |" in rows


# ------------------------------------------------------------------ signatures
def plain_factory(a: int, *, b: float = 2.0, c: str) -> dict[str, Any]:
    return {"a": a, "b": b, "c": c}


def open_factory(*, x: int = 1, **rest: Any) -> dict[str, Any]:
    return {"x": x, **rest}


def test_signature_becomes_an_untyped_spec():
    spec = signature_spec(plain_factory, n_args=1)
    assert isinstance(spec, OptionSpec) and spec.cls is None and not spec.open
    assert spec.names == ["b", "c"]
    assert spec.missing({"b": 1}) == ["c"]
    # The factory checks its own values: they pass through unchanged.
    assert spec.validate({"b": "anything", "c": 3}, key="k") == {
        "b": "anything",
        "c": 3,
    }
    with pytest.raises(
        ConfigError, match=r"Unknown option k\.d\. Accepted options: b, c\."
    ):
        spec.validate({"d": 1}, key="k")
    assert signature_spec(open_factory).open
    assert signature_spec(open_factory).validate({"y": 2}, key="k") == {"y": 2}


@dataclass(frozen=True)
class CountOptions:
    n: int = option(2, low=1, help="How many.")


def count_miner(**options: Any) -> dict[str, Any]:
    return {"n": parse(CountOptions, options, key=KEY).n}


class ThirdParty:
    @hookimpl
    def tiahnm_register_miners(self, register):
        register("plain", plain_factory)
        register("open", open_factory)
        register("counted", count_miner, options=CountOptions)


@pytest.fixture
def third_party() -> PluginManager:
    pm = PluginManager(autoload=False)
    pm.register(ThirdParty(), name="third_party")
    return pm


def test_plugin_without_options_class_is_checked_through_its_signature(third_party):
    miners = third_party.get("miner")
    assert miners["plain"].options is None
    assert miners.create("plain", 1, c="z") == {"a": 1, "b": 2.0, "c": "z"}
    with pytest.raises(
        ConfigError,
        match=r"Unknown option miner\.options\.q\. Accepted options: b, c\.",
    ):
        miners.create("plain", 1, key="miner.options", q=1)
    with pytest.raises(
        PluginError, match=r"miner 'plain' needs option\(s\) miner\.options\.c"
    ):
        miners.create("plain", 1)
    # A **kwargs factory without a class accepts any key, as before.
    assert miners.create("open", y=3) == {"x": 1, "y": 3}


def test_declared_options_are_checked_before_building(third_party):
    miners = third_party.get("miner")
    entry = miners["counted"]
    assert entry.options is CountOptions
    assert entry.spec().names == ["n"]
    assert miners.create("counted", n=5) == {"n": 5}
    # The registry's key names the error even though the factory's own key differs.
    with pytest.raises(
        ConfigError, match=r"^sweep\.x\.n: expected an integer >= 1, got 0\.$"
    ):
        miners.create("counted", key="sweep.x", n=0)
    with pytest.raises(
        ConfigError, match=r"Unknown option miner\.options\.m\. Accepted options: n\."
    ):
        miners.create("counted", m=1)


def test_options_must_be_a_dataclass():
    class Bad:
        @hookimpl
        def tiahnm_register_miners(self, register):
            register("bad", plain_factory, options=dict)

    pm = PluginManager(autoload=False)
    pm.register(Bad(), name="bad")
    assert "bad" not in pm.get("miner")
    assert any("must be a dataclass" in f.error for f in pm.failures)


# ------------------------------------------------------------------ the miners
@pytest.mark.parametrize(
    ("cls", "options"),
    [(MHIMMiner, MHIMOptions), (HNMMiner, HNMOptions), (Li2019Miner, Li2019Options)],
)
def test_miner_attributes_are_the_declared_defaults(cls, options):
    miner = cls()
    for name, value in defaults(options).items():
        got = getattr(miner, name)
        assert got == value, name
        assert type(got) is type(value), name


def test_mhim_defaults_presets_and_null():
    assert DEFAULTS == {k: v for k, v in defaults(MHIMOptions).items() if k != "preset"}
    assert DEFAULTS["mask_ratio_h"] == 0.01 and DEFAULTS["momentum"] == 0.9999
    miner = MHIMMiner(preset="v2", mask_ratio_h=0.05, tau_t=None)
    expected = {**DEFAULTS, **PRESETS["v2"], "mask_ratio_h": 0.05}
    assert miner.options == expected
    assert miner.preset == "v2"
    for name, value in expected.items():
        assert getattr(miner, name) == value, name
    # Preset values go through the same checks as explicit ones.
    assert parse(MHIMOptions, {"preset": "tcga_abmil"}, key=KEY).mask_ratio_hr == 1.0
    # null means "not set", but an unknown key is still refused.
    with pytest.raises(ConfigError, match=r"Unknown option miner\.options\.bogus"):
        MHIMMiner(bogus=None)


def test_registry_validation_rejects_bad_miner_values_without_building():
    entry = get_registry("miner")["mhim"]
    with pytest.raises(
        ConfigError,
        match=r"^miner\.options\.mask_ratio_h: expected a number in \[0, 1\], got 1\.5\.$",
    ):
        entry.check({"mask_ratio_h": 1.5}, key=KEY)
    with pytest.raises(
        ConfigError, match=r"^miner\.options\.preset: expected one of c16_abmil"
    ):
        entry.check({"preset": "c17"}, key=KEY)
    entry.check({"teacher_init": "runs/{fold_name}/best.pt"}, key=KEY)  # no file check


BUILTIN = PluginManager(autoload=False)
DECLARED = [
    (kind, name)
    for kind in KINDS
    for name in BUILTIN.get(kind)
    if BUILTIN.get(kind)[name].options is not None
]


def test_builtin_declared_components():
    assert {
        ("miner", "mhim"),
        ("miner", "hnm"),
        ("miner", "li2019"),
        ("head", "abmil"),
        ("head", "clam_sb"),
        ("loss", "mirank"),
        ("task", "survival"),
    } <= set(DECLARED)


@pytest.mark.parametrize(("kind", "name"), DECLARED)
def test_declared_defaults_parse_and_are_documented(kind, name):
    """Registry-driven: defaults parse cleanly; docs/configuration.md shows them."""
    entry = BUILTIN.get(kind)[name]
    given = defaults(entry.options)
    assert parse(entry.options, given, key=f"{kind}.options") == entry.options()
    assert list(given) == [f.name for f in dataclasses.fields(entry.options)]
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    section = doc.split(f"### {kind} `{name}`")[1].split("###")[0]
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[3].strip().strip("`")
        for line in section.splitlines()
        if line.startswith("| `")
    }
    shown = {
        k: "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in given.items()
    }
    assert rows == shown


@dataclass
class DataclassFactory:
    """A dataclass registered as a factory, without options=: its signature counts."""

    n: int = 1


def test_a_dataclass_factory_is_not_mistaken_for_an_options_class():
    spec = signature_spec(DataclassFactory)
    assert spec.cls is None and spec.names == ["n"]
    assert spec.validate({"n": "not checked"}, key="k") == {"n": "not checked"}
    with pytest.raises(TypeError, match="not an options dataclass"):
        spec_of(plain_factory)
