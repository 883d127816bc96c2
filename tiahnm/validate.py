"""One validation pass over a whole config before any stage runs.

Every component name (head, miner, losses, bag source, encoder of the extract stage)
is looked up and every ``*.options`` mapping is checked against the plugin's options
(unknown options, required options missing, and the values of declared options, see
:mod:`tiahnm.utils.options`) without building anything, so a typo in
``head.name`` is reported in a second, not after hours of feature extraction. All
problems are reported together in one error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tiahnm.config import Config
from tiahnm.errors import ConfigError, PluginError
from tiahnm.plugins import ensure_options_mapping, get_registry

logger = logging.getLogger(__name__)

#: Learning rates above these are almost certainly a typo (warned, not refused).
LR_WARN = {"adam": 1.0, "adamw": 1.0, "sgd": 10.0}


def _component(
    kind: str,
    name: str,
    options: Any,
    key: str,
    *,
    n_args: int = 0,
    provided: tuple[str, ...] = (),
) -> Exception | None:
    """The problem with one component, or None."""
    try:
        opts = ensure_options_mapping(options, key)
        entry = get_registry(kind)[name]
        entry.check(opts, key=key, n_args=n_args)  # names, and declared values
        missing = [
            m for m in entry.spec(n_args=n_args).missing(opts) if m not in provided
        ]
    except (ConfigError, PluginError) as exc:
        return exc
    if missing:
        shown = ", ".join(f"{key}.{m}" for m in missing)
        return PluginError(f"{kind} {name!r} needs option(s) {shown}.")
    return None


def _encoder(config: Config) -> Exception | None:
    from tiahnm.encoders.build import split_encoder_name

    plugin, model = split_encoder_name(config.extract.encoder)
    provided = ("model",) if model is not None else ()
    return _component(
        "encoder",
        plugin,
        config.extract.encoder_options,
        "extract.encoder_options",
        provided=(*provided, "weights"),
    )


def validate_config(
    config: Config, *, warn: Callable[[str], None] | None = None
) -> list[str]:
    """Check every component name and option of ``config``; return warnings.

    Args:
        config (Config): The loaded config.
        warn (Callable | None): Called with each warning (default: the log).

    Returns:
        list[str]: Warnings (suspicious but allowed settings).

    Raises:
        PluginError: An unknown name or a missing required option (all problems in
            one message); ConfigError when only options are wrong.
    """
    provided = ("features_dir",) if config.extract.slides else ()
    problems = [
        _component(
            "head", config.head.name, config.head.options, "head.options", n_args=2
        ),
        _component("miner", config.miner.name, config.miner.options, "miner.options"),
        _component(
            "bag_source",
            config.data.source,
            config.data.options,
            "data.options",
            provided=provided,
        ),
        *(
            _component("loss", spec.name, spec.options, f"losses[{i}].options")
            for i, spec in enumerate(config.losses)
        ),
    ]
    if config.extract.slides:
        problems.append(_encoder(config))
    found = [p for p in problems if p is not None]
    if found:
        text = " ".join(str(p) for p in found)
        if _is_untouched_template(config):
            text += (
                " The config is the unedited `tiahnm init` template: set "
                "data.options (features_dir and labels_csv) or extract.slides, or run "
                "the demo with `tiahnm run --demo`."
            )
        cls = (
            PluginError
            if any(isinstance(p, PluginError) for p in found)
            else ConfigError
        )
        raise cls(text)
    warnings = _warnings(config)
    for w in warnings:
        (warn or logger.warning)(w)
    return warnings


def _is_untouched_template(config: Config) -> bool:
    return not config.data.options and not config.extract.slides


def _warnings(config: Config) -> list[str]:
    out = []
    limit = LR_WARN.get(config.train.optimizer)
    if limit is not None and config.train.lr > limit:
        out.append(
            f"train.lr={config.train.lr:g} is unusually large for "
            f"{config.train.optimizer} (typical: 1e-5 to 1e-2); training will likely "
            "diverge."
        )
    return out
