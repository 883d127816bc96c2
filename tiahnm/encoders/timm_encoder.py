"""Any ``timm`` model as a patch encoder (``num_classes=0``: pooled features).

``timm.create_model(name, pretrained=False, num_classes=0)`` builds the network
without downloading anything; a local weights file (``.pth``/``.bin`` read with
``torch.load(weights_only=True)``, or ``.safetensors``) is then loaded. Keys of the
removed classifier in the checkpoint are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tiahnm.encoders.base import (
    RANDOM_INIT,
    EncoderModule,
    Preprocessing,
    check_weights_path,
    describe_encoder,
    load_state_dict_file,
    load_weights,
    make_preprocessing,
    sha256_file,
)
from tiahnm.encoders.presets import HF_CACHE
from tiahnm.encoders.timm_hub import hub_snapshot, hub_weights_file, split_hub_name
from tiahnm.errors import ConfigError


def timm_encoder(
    *,
    model: str,
    weights: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> EncoderModule:
    """Build a timm model without classifier, with local weights.

    Args:
        model (str): timm model name (``timm.list_models()``), e.g. ``"resnet50"``,
            ``"vit_small_patch16_224"``, or ``hf-hub:ORG/NAME[@REV]``: a timm
            repository read from the filled Hugging Face cache (its
            ``config.json`` fixes the architecture and mean/std; never a download).
        weights (str | None): Local weights file, or ``"random-init"``. Required,
            except for ``hf-hub:`` names (default: the cached snapshot's weights,
            also ``"hf-cache"``).
        model_kwargs (Mapping | None): Extra ``timm.create_model`` keyword arguments
            (e.g. ``{"img_size": 224, "init_values": 1e-5}`` for ViT foundation models;
            ``"layer:SwiGLUPacked"``, ``"layer:SiLU"``, ``"layer:GELU"`` name layer
            classes).
        input_size (int | None): Input side (default: the ``img_size`` the network
            was built with, e.g. ``model_kwargs: {img_size: 224}``).
        mean (Sequence[float] | None): Normalisation mean. Required unless ``model``
            names a pretrained tag (``resnet50.a1_in1k``), whose statistics are then
            used: a bare architecture's default tag says nothing about the weights
            you load (for UNI's ``vit_large_patch16_224`` it is 0.5/0.5, not the
            ImageNet statistics UNI was trained with). Named presets
            (``tiahnm encoders``) carry their own.
        std (Sequence[float] | None): Normalisation std (same rule).

    Returns:
        EncoderModule: ``[B, 3, H, W] -> [B, D]``.

    Raises:
        ConfigError: Unknown model, a hub name missing from the cache, no usable
            weights file, or no mean/std for a bare architecture name.
        DataError: The weights file does not fit the network.
    """
    import timm

    who = f"timm encoder {model!r}"
    source, path = _source_and_weights(model, weights, who=who)
    from tiahnm.encoders.preset_archs import resolve_kwargs

    # "layer:SwiGLUPacked" / "layer:SiLU" name the classes YAML cannot hold
    kwargs = resolve_kwargs(model_kwargs or {})
    try:
        net = timm.create_model(source, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        msg = f"{who}: {exc}. See timm.list_models()."
        raise ConfigError(msg) from None
    except TypeError as exc:
        msg = f"{who}: bad model_kwargs {kwargs}: {exc}"
        raise ConfigError(msg) from None
    except (KeyError, ValueError) as exc:  # a config.json timm cannot read
        msg = f"{who}: {source.removeprefix('local-dir:')}/config.json is not a timm model config ({type(exc).__name__}: {exc})."
        raise ConfigError(msg) from None
    if path is not None:
        classifier = net.pretrained_cfg.get("classifier") or ()
        if isinstance(classifier, str):
            classifier = (classifier,)
        load_weights(
            net,
            load_state_dict_file(path),
            source=path,
            ignore_prefixes=(*classifier, "head", "fc", "classifier", "head_dist"),
        )
    prep = _preprocessing(model, net, input_size=input_size, mean=mean, std=std)
    encoder = EncoderModule(
        net,
        out_dim=int(getattr(net, "num_features", 0)),
        preprocessing=prep,
        weights_sha256=sha256_file(path) if path is not None else RANDOM_INIT,
        spec=f"timm:{model}",
    )
    encoder.out_dim, _ = describe_encoder(encoder, probe=True)
    return encoder


def _source_and_weights(
    model: str, weights: str | None, *, who: str
) -> tuple[str, Path | None]:
    """What timm builds and the weights file (None for ``random-init``).

    The build source is ``model`` itself, or ``local-dir:`` of a cached hub snapshot.

    ``hf-hub:ORG/NAME`` reads the filled Hugging Face cache only: its weights are the
    snapshot's unless ``weights`` names a file (or ``random-init``).

    Raises:
        ConfigError: No usable weights, or the hub repository is not in the cache.
    """
    hub = split_hub_name(model)
    if hub is None:
        how = (
            'on a machine with internet, run python -c "import timm, torch; '
            f"torch.save(timm.create_model('{model}', pretrained=True).state_dict(), "
            f"'{model}.pth')\" and copy the file here."
        )
        return model, check_weights_path(weights, who=who, how=how)
    snapshot = hub_snapshot(*hub)
    if weights is None or str(weights) in ("", HF_CACHE):
        return f"local-dir:{snapshot}", hub_weights_file(snapshot, *hub)
    how = "or leave --weights out to use the snapshot's own weights."
    return f"local-dir:{snapshot}", check_weights_path(weights, who=who, how=how)


def _preprocessing(
    model: str,
    net: Any,
    *,
    input_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Preprocessing:
    """Input size from the built network; mean/std given or from a named tag.

    Raises:
        ConfigError: No mean/std and ``model`` has no pretrained tag.
    """
    import timm

    # a hub repository's own config.json carries its statistics, like a tag
    has_tag = "." in model or split_hub_name(model) is not None
    if (mean is None or std is None) and not has_tag:
        msg = (
            f"timm encoder {model!r}: give mean and std (encoder options "
            "mean: [...], std: [...]) or name a pretrained tag (ARCH.TAG) whose "
            "statistics match your weights; tiahnm does not guess the normalisation "
            "from the architecture's default tag. Published pathology models have "
            "named presets: see `tiahnm encoders`."
        )
        raise ConfigError(msg)
    config = timm.data.resolve_model_data_config(net)
    built = getattr(getattr(net, "patch_embed", None), "img_size", None)
    side = int(built[-1]) if built else int(config["input_size"][-1])
    default = Preprocessing(
        input_size=side, mean=tuple(config["mean"]), std=tuple(config["std"])
    )
    return make_preprocessing(default, input_size=input_size, mean=mean, std=std)
