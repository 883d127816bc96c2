"""Typed component options: declared once, validated, documented, one set of defaults.

A component declares its options as a dataclass whose fields carry a type hint, a
default and, through :func:`option`, bounds, choices and a help line::

    @dataclass(frozen=True)
    class TopKOptions:
        k: int = option(8, low=1, help="Instances pooled.")
        mode: str = option("mean", choices=("mean", "max"), help="Pooling.")

    opts = parse(TopKOptions, {"k": 4}, key="miner.options")  # TopKOptions(k=4, ...)

:func:`parse` rejects unknown keys (naming the known ones), coerces and checks every
value, and names the full dotted key in every error (``miner.options.k: expected an
integer >= 1, got 0.``); the errors are :class:`~tiahnm.errors.ConfigError` (exit code 2)
and :class:`~tiahnm.errors.PluginError` for a required option that is missing. The
same class gives the defaults (:func:`defaults`) and the documentation
(:func:`markdown_table`).

A factory registered without an options class is described by its signature
(:func:`signature_spec`): the same :class:`OptionSpec`, with untyped fields (the factory keeps
checking its own values), so unknown and missing options go through one code path. A
``**kwargs`` factory without a class accepts any key.

This module is a low layer: it imports nothing of tiahnm but the errors.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from tiahnm.errors import ConfigError, PluginError


class _Required:
    """Marks an option without a default."""

    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of an option the config must give.
REQUIRED: Any = _Required()

__all__ = [
    "REQUIRED",
    "OptionField",
    "OptionSpec",
    "Options",
    "coerce",
    "defaults",
    "markdown_table",
    "option",
    "parse",
    "signature_spec",
    "spec_of",
    "type_name",
]


def option(
    default: Any = REQUIRED,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    choices: Sequence[Any] | None = None,
    check: Callable[[Any], bool] | None = None,
    expect: str | None = None,
    help: str = "",
) -> Any:
    """A dataclass field of an options class, with its checks and its help line.

    Args:
        default (Any): The default (omit for a required option: :data:`REQUIRED`). Lists and dicts are
            copied for every instance.
        low (float | None): Lower bound of a number (inclusive unless ``open_low``).
        high (float | None): Upper bound (inclusive unless ``open_high``).
        open_low (bool): Exclude ``low`` itself.
        open_high (bool): Exclude ``high`` itself.
        choices (Sequence | None): The allowed values.
        check (Callable | None): Extra predicate on the coerced value.
        expect (str | None): What the value must be, for the error message (default:
            derived from the type, the bounds and the choices).
        help (str): One line for the documentation.

    Returns:
        Any: A :func:`dataclasses.field`.
    """
    meta = {
        "low": low,
        "high": high,
        "open_low": open_low,
        "open_high": open_high,
        "choices": tuple(choices) if choices is not None else None,
        "check": check,
        "expect": expect,
        "help": help,
    }
    if default is REQUIRED:
        return dataclasses.field(metadata={"option": meta})
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata={"option": meta}
        )
    return dataclasses.field(default=default, metadata={"option": meta})


# ----------------------------------------------------------------------- types
def type_name(tp: Any) -> str:
    """Short name of a type hint (``int``, ``'a' | 'b'``, ``float or null``)."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(
        f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}."
    )


def coerce(
    value: Any,
    tp: Any,
    key: str,
    *,
    nested: Callable[[type, Any, str], Any] | None = None,
    numeric_strings: bool = False,
) -> Any:
    """Check ``value`` against the type hint ``tp``; return it converted where lossless.

    Handles ``Any``, unions and ``None``, ``Literal``, ``list``/``tuple``/``Sequence``,
    ``dict``, ``bool``, ``int`` (not a bool), ``float`` (an int becomes a float),
    ``str``, ``Path`` (from a string) and, through ``nested``, dataclasses.

    Args:
        value (Any): The value read from the config.
        tp (Any): The type hint.
        key (str): Dotted key, for the message.
        nested (Callable | None): Builds a dataclass-typed value:
            ``nested(cls, value, key)``.
        numeric_strings (bool): Read a string such as ``"1e-4"`` as a float (YAML 1.1
            reads ``1e-4`` without a dot as a string).

    Returns:
        Any: The converted value.

    Raises:
        ConfigError: The value does not fit, naming ``key``.
    """
    kw = {"nested": nested, "numeric_strings": numeric_strings}
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return coerce(value, arg, key, **kw)
            except ConfigError:
                continue
        raise _type_error(key, value, tp)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, value, tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        if isinstance(value, (int, float)) and str(value) in allowed:
            return str(value)
        msg = f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}."
        raise ConfigError(msg)
    if dataclasses.is_dataclass(tp) and nested is not None:
        return nested(tp, value, key)
    if origin in (list, tuple, Sequence, typing.Sequence):
        return _coerce_sequence(value, tp, key, kw)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return {str(k): v for k, v in value.items()}
    return _coerce_scalar(value, tp, key, numeric_strings=numeric_strings)


def _coerce_sequence(value: Any, tp: Any, key: str, kw: dict[str, Any]) -> Any:
    origin = get_origin(tp)
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, value, tp)
    args = get_args(tp)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            msg = f"{key}: expected {len(args)} items, got {len(value)}."
            raise ConfigError(msg)
        return tuple(
            coerce(v, a, f"{key}[{i}]", **kw)
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    item = args[0] if args else Any
    items = [coerce(v, item, f"{key}[{i}]", **kw) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, tp: Any, key: str, *, numeric_strings: bool) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if numeric_strings and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp)
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _type_error(key, value, tp)
    raise _type_error(key, value, tp)


# ----------------------------------------------------------------------- specs
@dataclass(frozen=True)
class OptionField:
    """One option: its name, type, default and checks.

    Attributes:
        name (str): Option name.
        type (Any): Type hint (``Any`` for a factory parameter: not checked here).
        default (Any): The default, or :data:`REQUIRED`.
        low, high (float | None): Bounds of a number.
        open_low, open_high (bool): Bounds excluded.
        choices (tuple | None): Allowed values.
        check (Callable | None): Extra predicate.
        expect (str | None): Override of the expected-value description.
        help (str): Documentation line.
    """

    name: str
    type: Any = Any
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], bool] | None = None
    expect: str | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        """No default: the config must give it."""
        return self.default is REQUIRED

    @property
    def checked(self) -> bool:
        """Whether values are checked here (a declared option, not a bare parameter)."""
        return self.type is not Any or self.choices is not None

    def describe(self) -> str:
        """What a valid value is, in words (``an integer >= 1``, ``one of a, b``)."""
        if self.expect is not None:
            return self.expect
        if self.choices is not None:
            words = "one of " + ", ".join(str(c) for c in self.choices)
            return words + (" or null" if _admits_none(self.type) else "")
        return _describe(self.type, self)

    def validate(self, value: Any, key: str) -> Any:
        """``value`` coerced and checked; a :class:`ConfigError` naming ``key`` if not.

        Args:
            value (Any): The value given.
            key (str): Full dotted key of this option (``miner.options.k``).

        Returns:
            Any: The value to use.
        """
        if not self.checked:
            return value
        try:
            out = coerce(value, self.type, key)
        except ConfigError:
            raise self._error(key, value) from None
        if not self._fits(out):
            raise self._error(key, value)
        return out

    def _fits(self, value: Any) -> bool:
        if value is None:
            return True  # an Optional type accepted it; bounds are for the number
        if self.choices is not None and value not in self.choices:
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                return False
            if self.low is not None and not (
                value > self.low if self.open_low else value >= self.low
            ):
                return False
            if self.high is not None and not (
                value < self.high if self.open_high else value <= self.high
            ):
                return False
        return self.check is None or bool(self.check(value))

    def _error(self, key: str, value: Any) -> ConfigError:
        return ConfigError(f"{key}: expected {self.describe()}, got {value!r}.")


def _admits_none(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a path",
    type(None): "null",
    dict: "a mapping",
}


def _describe(tp: Any, f: OptionField | None = None) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if Path in args:  # a string is read as a path
            args = tuple(a for a in args if a is not str)
        return " or ".join(_describe(a, f) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple, Sequence, typing.Sequence):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return "a list" + (f" of {_describe(args[0])}" if len(args) == 1 else "")
    if origin is dict:
        return "a mapping"
    words = _WORDS.get(tp, type_name(tp))
    if f is not None and tp in (int, float):
        words += _bounds(f)
    return words


def _bounds(f: OptionField) -> str:
    low, high = f.low, f.high
    if low is not None and high is not None:
        left = "(" if f.open_low else "["
        right = ")" if f.open_high else "]"
        return f" in {left}{low}, {high}{right}"
    if low is not None:
        return f" {'>' if f.open_low else '>='} {low}"
    if high is not None:
        return f" {'<' if f.open_high else '<='} {high}"
    return ""


@dataclass(frozen=True)
class OptionSpec:
    """The options a component takes.

    Attributes:
        fields (tuple[OptionField, ...]): The options, in declaration order.
        cls (type | None): The declared options dataclass (None: from a signature).
        open (bool): Unknown keys are accepted (a ``**kwargs`` factory without a class).
    """

    fields: tuple[OptionField, ...]
    cls: type | None = None
    open: bool = False

    @property
    def names(self) -> list[str]:
        """Option names, in declaration order."""
        return [f.name for f in self.fields]

    def unknown(self, options: Mapping[str, Any]) -> list[str]:
        """Keys of ``options`` that are not options of this spec."""
        if self.open:
            return []
        names = set(self.names)
        return [k for k in options if k not in names]

    def missing(self, options: Mapping[str, Any]) -> list[str]:
        """Required options not in ``options``."""
        return [f.name for f in self.fields if f.required and f.name not in options]

    def check_names(self, options: Mapping[str, Any], *, key: str) -> None:
        """Raise :class:`ConfigError` for the first unknown key, listing the known."""
        for opt in self.unknown(options):
            accepted = ", ".join(self.names) or "(none)"
            msg = f"Unknown option {key}.{opt}. Accepted options: {accepted}."
            raise ConfigError(msg)

    def check_required(
        self, options: Mapping[str, Any], *, key: str, what: str
    ) -> None:
        """Raise :class:`PluginError` naming the required options missing from ``key``."""
        missing = self.missing(options)
        if missing:
            shown = ", ".join(f"{key}.{m}" for m in missing)
            msg = f"{what} needs option(s) {shown} (missing from the config)."
            raise PluginError(msg)

    def validate(
        self, options: Mapping[str, Any], *, key: str, what: str | None = None
    ) -> dict[str, Any]:
        """The given options, checked and coerced (no defaults added).

        Args:
            options (Mapping): Option name to value, as in the config.
            key (str): Config key of the mapping (``miner.options``).
            what (str | None): The component (``miner 'x'``), for the message of a
                missing required option; None checks no required options.

        Returns:
            dict: The same keys with validated values.
        """
        self.check_names(options, key=key)
        if what is not None:
            self.check_required(options, key=key, what=what)
        by_name = {f.name: f for f in self.fields}
        return {
            k: by_name[k].validate(v, f"{key}.{k}") if k in by_name else v
            for k, v in options.items()
        }

    def defaults(self) -> dict[str, Any]:
        """Default of every option that has one."""
        return {f.name: f.default for f in self.fields if not f.required}


def _fields_of_class(cls: type) -> tuple[OptionField, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata.get("option", {}))
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append(
            OptionField(name=f.name, type=hints[f.name], default=default, **meta)
        )
    return tuple(out)


def _fields_of_signature(
    factory: Callable[..., Any], n_args: int
) -> tuple[tuple[OptionField, ...], bool]:
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without signature
        return (), True
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fields = tuple(
        OptionField(
            name=p.name,
            default=REQUIRED if p.default is inspect.Parameter.empty else p.default,
        )
        for p in params[n_args:]
        if p.kind in kinds
    )
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return fields, has_kwargs


@functools.cache
def spec_of(cls: type) -> OptionSpec:
    """The :class:`OptionSpec` of an options dataclass declared with :func:`option`.

    Args:
        cls (type): The options dataclass.

    Returns:
        OptionSpec: Its options, typed and checked.

    Raises:
        TypeError: ``cls`` is not a dataclass.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        msg = f"{cls!r} is not an options dataclass."
        raise TypeError(msg)
    return OptionSpec(_fields_of_class(cls), cls=cls)


def signature_spec(factory: Callable[..., Any], *, n_args: int = 0) -> OptionSpec:
    """The :class:`OptionSpec` of a factory without a declared options class.

    Its keyword parameters after the first ``n_args`` positional ones become untyped
    options (the factory checks its own values); ``**kwargs`` makes the spec open. A
    dataclass used as a factory is described by its signature too.

    Args:
        factory (Callable): The registered factory.
        n_args (int): Positional arguments the caller passes (``in_dim``, ``n_classes``
            for heads), not options.

    Returns:
        OptionSpec: The options.
    """
    fields, has_kwargs = _fields_of_signature(factory, n_args)
    return OptionSpec(fields, open=has_kwargs)


class Options:
    """Base of a declared options dataclass (subclass it with ``@dataclass``).

    :meth:`prepare` may rewrite the given mapping before it is checked (e.g. fill in a
    preset's values); by default it returns it unchanged.
    """

    @classmethod
    def prepare(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The mapping to check, from the one given (default: unchanged)."""
        return given


def parse(cls: type, options: Mapping[str, Any] | None, *, key: str) -> Any:
    """An instance of the options dataclass ``cls`` from a config mapping.

    When ``cls`` is an :class:`Options`, its :meth:`~Options.prepare` sees the mapping
    first.

    Args:
        cls (type): The options dataclass.
        options (Mapping | None): Option name to value (``None``: all defaults).
        key (str): Config key of the mapping, e.g. ``miner.options``.

    Returns:
        Any: ``cls(**validated options)``, defaults for the rest.

    Raises:
        ConfigError: An unknown key or a bad value, naming ``key.<option>``.
        PluginError: A required option is missing.
    """
    values = _prepared(cls, options)
    return cls(**spec_of(cls).validate(values, key=key, what=key))


def check_values(cls: type, options: Mapping[str, Any] | None, *, key: str) -> None:
    """Check names and values of ``options`` against ``cls`` (required ones not).

    For a check before the component is built, when some required options are filled
    in later (e.g. by another stage).

    Raises:
        ConfigError: An unknown key or a bad value, naming ``key.<option>``.
    """
    spec_of(cls).validate(_prepared(cls, options), key=key)


def _prepared(cls: type, options: Mapping[str, Any] | None) -> dict[str, Any]:
    given = dict(options or {})
    if isinstance(cls, type) and issubclass(cls, Options):
        return cls.prepare(given)
    return given


def defaults(cls: type) -> dict[str, Any]:
    """The documented defaults of the options dataclass ``cls`` (a fresh copy)."""
    return copy.deepcopy(spec_of(cls).defaults())


def markdown_table(spec: OptionSpec) -> list[str]:
    """Rows ``| option | type | default | meaning |`` of a spec, header included."""
    lines = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for f in spec.fields:
        default = "(required)" if f.required else f"`{_shown(f.default)}`"
        kind = f.describe() if f.checked else "any"
        cells = [f"`{f.name}`", kind, default, f.help]
        lines.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    return lines


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return repr(value)
