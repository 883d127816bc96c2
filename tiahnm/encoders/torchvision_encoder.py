"""Any ``torchvision.models`` classification architecture as a patch encoder.

The network is built without weights (nothing is downloaded), the classification head
(the last ``nn.Linear``) is replaced by ``nn.Identity`` so the output is the pooled
feature vector, and a local state-dict file is loaded with
``torch.load(weights_only=True)``. Checkpoints with or without the head are accepted.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn

from tiahnm.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
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


def remove_head(net: nn.Module) -> tuple[str, int]:
    """Replace the last ``nn.Linear`` of ``net`` by ``nn.Identity`` in place.

    Returns:
        tuple[str, int]: The head's qualified name (``"fc"``, ``"classifier.1"``,
        ``"heads.head"`` ...) and its ``in_features`` (the feature width).

    Raises:
        ConfigError: ``net`` has no ``nn.Linear`` (e.g. SqueezeNet).
    """
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        msg = (
            f"{type(net).__name__} has no nn.Linear classification head to remove; "
            "use the 'module' encoder with your own feature network instead."
        )
        raise ConfigError(msg)
    name, head = linears[-1]
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return name, int(head.in_features)


def _default_preprocessing(arch: str) -> Preprocessing:
    """Crop size, mean and std of the architecture's default torchvision weights.

    Only the weights' metadata is read (no download).
    """
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        size = int(transforms.crop_size[0])
        return Preprocessing(
            input_size=size, mean=tuple(transforms.mean), std=tuple(transforms.std)
        )
    except Exception:  # architectures without a weights enum
        return Preprocessing(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def torchvision_encoder(
    *,
    model: str,
    weights: str | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> EncoderModule:
    """Build a torchvision backbone without its head, with local weights.

    Args:
        model (str): Architecture name from ``torchvision.models.list_models()``, e.g.
            ``"resnet18"``, ``"resnet50"``, ``"convnext_tiny"``, ``"vit_b_16"``.
        weights (str | None): Path of a state dict saved with
            ``torch.save(net.state_dict(), path)`` (with or without the head), or
            ``"random-init"``. Required: nothing is downloaded.
        input_size (int | None): Input side patches are resized to (default: the
            architecture's crop size, e.g. 224).
        mean (Sequence[float] | None): Normalisation mean (default ImageNet).
        std (Sequence[float] | None): Normalisation std (default ImageNet).

    Returns:
        EncoderModule: ``[B, 3, H, W] -> [B, D]`` pooled features.

    Raises:
        ConfigError: Unknown architecture or no usable weights file.
        DataError: The weights file is not a state dict that fits the network.
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        msg = (
            f"torchvision encoder: unknown architecture {model!r}.{hint} "
            "See torchvision.models.list_models()."
        )
        raise ConfigError(msg)
    who = f"torchvision encoder {model!r}"
    path = check_weights_path(
        weights,
        who=who,
        how=(
            'on a machine with internet, run python -c "import torch, torchvision; '
            f"torch.save(torchvision.models.get_model('{model}', weights='DEFAULT')"
            f".state_dict(), '{model}.pth')\" and copy the file here."
        ),
    )
    kwargs = {"aux_logits": False, "init_weights": False} if model in _AUX else {}
    net = torchvision.models.get_model(model, weights=None, **kwargs)
    head_name, out_dim = remove_head(net)
    if path is not None:
        state = load_state_dict_file(path)
        aux = ("AuxLogits", "aux1", "aux2") if model in _AUX else ()
        load_weights(net, state, source=path, ignore_prefixes=(head_name, *aux))
    prep = make_preprocessing(
        _default_preprocessing(model), input_size=input_size, mean=mean, std=std
    )
    encoder = EncoderModule(
        net,
        out_dim=out_dim,
        preprocessing=prep,
        weights_sha256=sha256_file(path) if path is not None else RANDOM_INIT,
        spec=f"torchvision:{model}",
    )
    encoder.out_dim, _ = describe_encoder(encoder, probe=True)
    return encoder


# Architectures with auxiliary classifiers: built without them (eval ignores them).
_AUX = frozenset({"inception_v3", "googlenet"})
