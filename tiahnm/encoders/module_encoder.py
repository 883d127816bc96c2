"""Any user ``nn.Module`` as a patch encoder, by import path ``"pkg.mod:Class"``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from tiahnm.encoders.base import (
    RANDOM_INIT,
    EncoderModule,
    Preprocessing,
    describe_encoder,
    load_state_dict_file,
    load_weights,
    make_preprocessing,
    sha256_file,
)
from tiahnm.errors import ConfigError


def import_object(target: str) -> Any:
    """Import ``"pkg.mod:attr"`` (or ``"pkg.mod.attr"``).

    Raises:
        ConfigError: The module or attribute cannot be imported (names it).
    """
    if ":" in target:
        module_name, _, attr = target.partition(":")
    else:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        msg = f"module encoder: {target!r} is not an import path like 'pkg.mod:Class'."
        raise ConfigError(msg)
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names:
        # no standard-library module defines an nn.Module, and importing some runs
        # code (``antigravity``, ``this``): refused without importing
        msg = (
            f"module encoder: {module_name!r} is a Python standard-library module; "
            "give the import path of an nn.Module class ('pkg.mod:Class')."
        )
        raise ConfigError(msg)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"module encoder: cannot import {module_name!r} ({exc})."
        raise ConfigError(msg) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            msg = f"module encoder: {module_name!r} has no attribute {attr!r}."
            raise ConfigError(msg)
        obj = getattr(obj, part)
    return obj


def module_encoder(
    *,
    model: str,
    kwargs: Mapping[str, Any] | None = None,
    weights: str | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> EncoderModule:
    """Build ``Class(**kwargs)`` from an import path, optionally loading a checkpoint.

    The module should map ``[B, 3, H, W]`` to ``[B, D]`` (``[B, D, h, w]`` maps are
    average-pooled, tuples keep their first element). It may declare ``out_dim`` and a
    :class:`~tiahnm.encoders.base.Preprocessing` as ``preprocessing``; otherwise the
    width is measured and ImageNet normalisation without resizing is used.

    Args:
        model (str): ``"pkg.mod:Class"``, a ``torch.nn.Module`` subclass (checked
            before it is called; functions and other callables are refused).
        kwargs (Mapping | None): Keyword arguments for the callable.
        weights (str | None): Local state-dict file (loaded strictly with
            ``weights_only=True``), or None / ``"random-init"`` for the module as built.
        input_size (int | None): Override the input side.
        mean (Sequence[float] | None): Override the normalisation mean.
        std (Sequence[float] | None): Override the normalisation std.

    Returns:
        EncoderModule: The wrapped module.

    Raises:
        ConfigError: Bad import path, failing constructor, or missing weights file.
        DataError: The weights file does not fit the module.
    """
    factory = import_object(model)
    # Checked before anything is called: a config may only construct nn.Module
    # classes, never run a function (``module:subprocess:run`` is refused here).
    if not (isinstance(factory, type) and issubclass(factory, nn.Module)):
        msg = (
            f"module encoder: {model!r} is a {type(factory).__name__}, not an "
            "nn.Module subclass; a config may only construct torch modules."
        )
        raise ConfigError(msg)
    try:
        net = factory(**dict(kwargs or {}))
    except TypeError as exc:
        msg = f"module encoder: {model}(**{dict(kwargs or {})}) failed: {exc}"
        raise ConfigError(msg) from None
    sha = RANDOM_INIT
    if weights is not None and str(weights) != RANDOM_INIT:
        from pathlib import Path

        path = Path(weights).expanduser()
        if not path.is_file():
            msg = (
                f"module encoder {model!r}: weights file {path} not found "
                "(give an existing state-dict file, or leave --weights out to use the "
                "module as built)."
            )
            raise ConfigError(msg)
        load_weights(net, load_state_dict_file(path), source=path)
        sha = sha256_file(path)
    out_dim, default = describe_encoder(net)
    declared = getattr(net, "preprocessing", None)
    prep = make_preprocessing(
        declared if isinstance(declared, Preprocessing) else default,
        input_size=input_size,
        mean=mean,
        std=std,
    )
    return EncoderModule(
        net,
        out_dim=out_dim,
        preprocessing=prep,
        weights_sha256=sha,
        spec=f"module:{model}",
    )
