"""Build a registered encoder for feature extraction, with its identity."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tiahnm.encoders.base import (
    RANDOM_INIT,
    EncoderInfo,
    EncoderModule,
    describe_encoder,
    load_state_dict_file,
    load_weights,
    sha256_file,
    state_sha256,
)
from tiahnm.errors import ConfigError


def split_encoder_name(name: str) -> tuple[str, str | None]:
    """``"torchvision:resnet18"`` to ``("torchvision", "resnet18")``.

    The part after the first colon is the encoder's ``model`` option, so
    ``"module:pkg.mod:Class"`` gives ``("module", "pkg.mod:Class")``.
    """
    plugin, sep, model = name.partition(":")
    return plugin, (model if sep else None)


def _accepts(factory: Any, option: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return True
    return any(
        p.name == option or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
    )


def build_encoder(
    name: str,
    *,
    weights: str | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> EncoderInfo:
    """Build encoder ``name`` from the registry, in eval mode on the CPU.

    Args:
        name (str): Registered encoder, optionally with its model after a colon:
            ``"small_cnn"``, ``"torchvision:resnet50"``, ``"timm:vit_small_patch16_224"``,
            ``"module:my_pkg.nets:Encoder"``.
        weights (str | None): Local weights file or ``"random-init"``. Passed to the
            factory when it takes ``weights``; otherwise loaded here (strict,
            ``weights_only=True``).
        options (Mapping | None): Other factory options.
        seed (int): Seed of the random initialisation (so that a random-init encoder
            is the same network in every run).

    Returns:
        EncoderInfo: The module and what identifies it in feature files.

    Raises:
        PluginError: Unknown encoder name.
        ConfigError: Bad options or missing weights.
        DataError: Unreadable weights.
    """
    from tiahnm.plugins import get_registry

    registry = get_registry("encoder")
    plugin, model = split_encoder_name(name)
    entry = registry[plugin]
    opts = dict(options or {})
    if model is not None:
        if not _accepts(entry.factory, "model"):
            msg = f"encoder {plugin!r} takes no model name (got {name!r})."
            raise ConfigError(msg)
        opts["model"] = model
    pass_weights = weights is not None and _accepts(entry.factory, "weights")
    if pass_weights:
        opts["weights"] = weights
    torch.manual_seed(seed)
    module = registry.create(plugin, key="encoder.options", **opts)
    if not isinstance(module, torch.nn.Module):
        msg = f"encoder {plugin!r} returned {type(module).__name__}, not an nn.Module."
        raise ConfigError(msg)
    sha = getattr(module, "weights_sha256", RANDOM_INIT)
    if weights is not None and not pass_weights and weights != RANDOM_INIT:
        path = Path(weights).expanduser()
        if not path.is_file():
            msg = f"encoder {name!r}: weights file {path} not found."
            raise ConfigError(msg)
        load_weights(module, load_state_dict_file(path), source=path)
        sha = sha256_file(path)
    module.eval()
    out_dim, prep = describe_encoder(module)
    card = module.card if isinstance(module, EncoderModule) else {}
    return EncoderInfo(
        card=dict(card),
        module=module,
        name=name,
        out_dim=out_dim,
        preprocessing=prep,
        weights_sha256=str(sha),
        state_sha256=state_sha256(module),
        options={k: v for k, v in opts.items() if k not in ("model", "weights")},
    )
