"""Any ``timm`` model as a patch encoder (``num_classes=0``: pooled features).

``timm.create_model(name, pretrained=False, num_classes=0)`` builds the network
without downloading anything; a local weights file (``.pth``/``.bin`` read with
``torch.load(weights_only=True)``, or ``.safetensors``) is then loaded. Keys of the
removed classifier in the checkpoint are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
            ``"vit_small_patch16_224"``; a ``hf-hub:`` name is refused (no download).
        weights (str | None): Local weights file, or ``"random-init"``. Required.
        model_kwargs (Mapping | None): Extra ``timm.create_model`` keyword arguments
            (e.g. ``{"img_size": 224, "init_values": 1e-5}`` for ViT foundation models).
        input_size (int | None): Input side (default: the model's pretrained config).
        mean (Sequence[float] | None): Normalisation mean (default: model config).
        std (Sequence[float] | None): Normalisation std (default: model config).

    Returns:
        EncoderModule: ``[B, 3, H, W] -> [B, D]``.

    Raises:
        ConfigError: Unknown model, a hub name, or no usable weights file.
        DataError: The weights file does not fit the network.
    """
    import timm

    if model.startswith(("hf-hub:", "hf_hub:")):
        msg = (
            f"timm encoder {model!r}: hub models are not downloaded; give the "
            "architecture name and its weights file with --weights."
        )
        raise ConfigError(msg)
    who = f"timm encoder {model!r}"
    path = check_weights_path(
        weights,
        who=who,
        how=(
            'on a machine with internet, run python -c "import timm, torch; '
            f"torch.save(timm.create_model('{model}', pretrained=True).state_dict(), "
            f"'{model}.pth')\" and copy the file here."
        ),
    )
    kwargs = dict(model_kwargs or {})
    try:
        net = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        msg = f"{who}: {exc}. See timm.list_models()."
        raise ConfigError(msg) from None
    except TypeError as exc:
        msg = f"{who}: bad model_kwargs {kwargs}: {exc}"
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
    config = timm.data.resolve_model_data_config(net)
    default = Preprocessing(
        input_size=int(config["input_size"][-1]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )
    prep = make_preprocessing(default, input_size=input_size, mean=mean, std=std)
    encoder = EncoderModule(
        net,
        out_dim=int(getattr(net, "num_features", 0)),
        preprocessing=prep,
        weights_sha256=sha256_file(path) if path is not None else RANDOM_INIT,
        spec=f"timm:{model}",
    )
    encoder.out_dim, _ = describe_encoder(encoder, probe=True)
    return encoder
