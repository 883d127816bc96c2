"""What every patch encoder exposes, and the helpers shared by the encoder plugins.

An encoder is a ``torch.nn.Module`` mapping ``[B, 3, H, W]`` float images to ``[B, D]``
features. For slide feature extraction it also describes itself with two attributes:

* ``out_dim`` (int): the feature width ``D``;
* ``preprocessing`` (:class:`Preprocessing`): how uint8 RGB patches become its input
  (resize, then ``(x / 255 - mean) / std``).

Encoders without them still work: :func:`describe_encoder` infers ``out_dim`` with one
dummy forward pass and falls back to ImageNet normalisation without resizing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tiahnm.errors import ConfigError, DataError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The ``weights`` value that asks for an untrained (randomly initialised) network.
RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class Preprocessing:
    """Turns a batch of uint8 RGB patches into an encoder's input.

    Two modes:

    * plain (``resize_size`` and ``crop_size`` unset): patches whose size differs
      from ``input_size`` are resized to ``input_size x input_size`` (bilinear,
      antialiased, on float values);
    * torchvision (either set, as the named presets do): exactly
      ``v2.Compose([Resize(resize_size, interpolation, antialias=True),
      CenterCrop(crop_size), ToDtype(float32, scale=True), Normalize(mean, std)])``
      on the uint8 patches, batched (``Resize`` of an int resizes the shorter side).

    Attributes:
        input_size (int | None): Side of the square input the encoder expects; in
            plain mode patches of another size are resized to it. ``None`` keeps the
            patch size.
        mean (tuple[float, ...]): Per-channel mean, on the 0-1 scale.
        std (tuple[float, ...]): Per-channel standard deviation, on the 0-1 scale.
        resize_size (int | None): torchvision mode: the shorter side is resized to
            this (``None``: no resize).
        crop_size (int | None): torchvision mode: centre crop to this square
            (``None``: no crop).
        interpolation (str): ``"bilinear"`` or ``"bicubic"`` (torchvision mode).
    """

    input_size: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int | None = None
    crop_size: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            msg = (
                f"preprocessing: mean {self.mean} and std {self.std} differ in length."
            )
            raise ConfigError(msg)
        if any(s <= 0 for s in self.std):
            msg = f"preprocessing: std {self.std} must be positive."
            raise ConfigError(msg)
        for name in ("input_size", "resize_size", "crop_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                msg = f"preprocessing: {name} {value} must be positive."
                raise ConfigError(msg)
        if self.interpolation not in ("bilinear", "bicubic"):
            msg = (
                f"preprocessing: interpolation {self.interpolation!r} must be "
                "'bilinear' or 'bicubic'."
            )
            raise ConfigError(msg)
        final = self.crop_size or self.resize_size
        if final is not None and self.input_size not in (None, final):
            msg = (
                f"preprocessing: input_size {self.input_size} differs from the "
                f"crop/resize size {final}."
            )
            raise ConfigError(msg)

    @property
    def torchvision_mode(self) -> bool:
        """Whether ``resize_size``/``crop_size`` select the torchvision pipeline."""
        return self.resize_size is not None or self.crop_size is not None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` uint8 (on any device) to ``[B, C, S, S]`` float32.

        The result is in channels-last memory format (same shape and values).
        """
        if self.torchvision_mode:
            x = self._resize_crop(batch.permute(0, 3, 1, 2)).float().div_(255.0)
            return self._normalize(x)
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(
                x,
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return self._normalize(x)

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Apply torchvision ``Resize`` (shorter side) then ``CenterCrop`` on uint8 NCHW."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if self.resize_size is not None:
            mode = InterpolationMode(self.interpolation)
            x = TF.resize(x, [self.resize_size], interpolation=mode, antialias=True)
        if self.crop_size is not None:
            x = TF.center_crop(x, [self.crop_size, self.crop_size])
        return x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        # channels-last: what the uint8 NHWC batch already is, and ~2x faster for
        # convolutions on CPU (oneDNN); harmless for other layers.
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stored in feature files).

        The torchvision-mode fields appear only when that mode is used, so files of
        the plain encoders keep their settings.
        """
        out: dict[str, Any] = {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.torchvision_mode:
            out.update(
                resize_size=self.resize_size,
                crop_size=self.crop_size,
                interpolation=self.interpolation,
            )
        return out


def make_preprocessing(
    default: Preprocessing,
    *,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocessing:
    """``default`` with the given fields overridden (torchvision-mode fields kept)."""
    from dataclasses import replace

    return replace(
        default,
        input_size=default.input_size if input_size is None else int(input_size),
        mean=default.mean if mean is None else tuple(float(v) for v in mean),
        std=default.std if std is None else tuple(float(v) for v in std),
    )


class EncoderModule(nn.Module):
    """A backbone with its feature width, preprocessing and weights identity.

    The forward pass returns ``[B, D]``: tuple/list outputs keep their first element and
    ``[B, D, h, w]`` maps are average-pooled.

    Args:
        net (nn.Module): The backbone (head already removed).
        out_dim (int): Feature width ``D``.
        preprocessing (Preprocessing): Its input preprocessing.
        weights_sha256 (str): SHA-256 of the weights file, or ``"random-init"``.
        spec (str): Human-readable name, e.g. ``"torchvision:resnet18"``.
        card (Mapping | None): Model card of a named preset (recorded in feature
            files); empty for the generic encoders.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        out_dim: int,
        preprocessing: Preprocessing,
        weights_sha256: str = RANDOM_INIT,
        spec: str = "",
        card: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.out_dim = int(out_dim)
        self.preprocessing = preprocessing
        self.weights_sha256 = weights_sha256
        self.spec = spec
        self.card = dict(card or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, out_dim]``."""
        return pool_output(self.net(x))


def pool_output(out: Any) -> torch.Tensor:
    """Reduce a backbone output to ``[B, D]`` (first element, spatial mean, flatten)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, Mapping):  # e.g. HF-style outputs
        out = next(iter(out.values()))
    if out.ndim == 4:  # [B, D, h, w]
        out = out.mean(dim=(2, 3))
    elif out.ndim == 3:  # [B, tokens, D]: the first (class) token
        out = out[:, 0]
    return out.reshape(out.shape[0], -1)


@dataclass
class EncoderInfo:
    """An encoder ready for extraction, and what identifies it in feature files.

    Attributes:
        module (nn.Module): The encoder (``[B, 3, H, W] -> [B, D]``), in eval mode.
        name (str): Name as given (``"small_cnn"``, ``"torchvision:resnet18"`` ...).
        out_dim (int): Feature width ``D``.
        preprocessing (Preprocessing): Input preprocessing.
        weights_sha256 (str): SHA-256 of the weights file, or ``"random-init"``.
        state_sha256 (str): SHA-256 of the parameters and buffers actually used, so
            two runs with different (e.g. random) weights never pass as the same.
        options (dict): Options given to the factory.
        card (dict): A named preset's model card (empty otherwise).
    """

    module: nn.Module
    name: str
    out_dim: int
    preprocessing: Preprocessing
    weights_sha256: str
    state_sha256: str
    options: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    def attributes(self) -> dict[str, Any]:
        """Attributes recorded in feature files."""
        return {
            "encoder": self.name,
            "encoder_out_dim": self.out_dim,
            "encoder_weights_sha256": self.weights_sha256,
            "encoder_state_sha256": self.state_sha256,
            "encoder_preprocessing": asdict(self.preprocessing),
            **({"encoder_card": self.card} if self.card else {}),
        }


def describe_encoder(
    module: nn.Module, *, probe: bool = False, probe_size: int = 224
) -> tuple[int, Preprocessing]:
    """``(out_dim, preprocessing)`` of ``module``, inferring what it does not declare.

    Args:
        module (nn.Module): The encoder.
        probe (bool): Measure ``out_dim`` with a dummy forward pass even when declared.
        probe_size (int): Image side of the dummy forward pass used when ``out_dim`` is
            not declared (or ``preprocessing.input_size`` when set).

    Returns:
        tuple[int, Preprocessing]: Feature width and preprocessing.
    """
    prep = getattr(module, "preprocessing", None)
    if not isinstance(prep, Preprocessing):
        prep = Preprocessing()
    out_dim = getattr(module, "out_dim", None)
    if probe or not isinstance(out_dim, int):
        size = prep.input_size or probe_size
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode():
                out = pool_output(module(torch.zeros(1, len(prep.mean), size, size)))
        except Exception as exc:
            msg = (
                f"encoder {type(module).__name__}: a dummy forward pass on "
                f"[1, {len(prep.mean)}, {size}, {size}] failed ({type(exc).__name__}: "
                f"{exc}); declare out_dim and preprocessing on the module."
            )
            raise ConfigError(msg) from None
        finally:
            module.train(was_training)
        out_dim = int(out.shape[-1])
    return out_dim, prep


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """Hex SHA-256 over the names, shapes, dtypes and bytes of a module's state."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_weights_path(weights: str | None, *, who: str, how: str) -> Path | None:
    """Validate a ``weights`` option: a local file, ``"random-init"``, or missing.

    Args:
        weights (str | None): The option value.
        who (str): The encoder, for messages (``"torchvision encoder 'resnet18'"``).
        how (str): One sentence telling how to obtain a weights file.

    Returns:
        Path | None: The file, or None for ``"random-init"``.

    Raises:
        ConfigError: When ``weights`` is missing or is not an existing file.
    """
    hint = (
        f"tiahnm never downloads weights: {how} Then pass --weights PATH "
        f"(or --weights {RANDOM_INIT} for an untrained network)."
    )
    if weights is None or str(weights).strip() == "":
        msg = f"{who} needs a local weights file. {hint}"
        raise ConfigError(msg)
    if str(weights) == RANDOM_INIT:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        msg = f"{who}: weights file {path} not found. {hint}"
        raise ConfigError(msg)
    return path


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pt``/``.pth``/``.bin`` (``weights_only``) or safetensors.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and the ``module.``
    prefix of DataParallel checkpoints are removed.

    Raises:
        DataError: The file is not a readable state dict (names the file).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())[:200]
        msg = (
            f"{path}: cannot read weights ({type(exc).__name__}: {text}...). "
            "Save them with torch.save(model.state_dict(), path): pickled modules are "
            "refused (torch.load(weights_only=True))."
        )
        raise DataError(msg) from None
    for key in ("state_dict", "model_state_dict", "model", "module", "teacher"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        msg = f"{path}: not a state dict of tensors (got {type(obj).__name__})."
        raise DataError(msg)
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str | Path,
    ignore_prefixes: Sequence[str] = (),
) -> None:
    """Load ``state`` into ``module``; only keys under ``ignore_prefixes`` may be extra.

    Args:
        module (nn.Module): Target (e.g. a backbone whose head was removed).
        state (Mapping): The state dict.
        source (str | Path): Weights file, for messages.
        ignore_prefixes (Sequence[str]): Prefixes of keys that may be in ``state`` but
            not in ``module`` (the removed classification head); keys that ``module``
            has are always loaded.

    Raises:
        DataError: Missing or unexpected keys, or shape mismatches (names the file).
    """
    own = module.state_dict().keys()
    state = {
        k: v
        for k, v in state.items()
        if k in own or not any(k == p or k.startswith(p + ".") for p in ignore_prefixes)
    }
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        msg = f"{source}: weights do not fit the network: {str(exc)[:600]}"
        raise DataError(msg) from None
    problems = []
    if result.missing_keys:
        problems.append(
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]})"
        )
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    if problems:
        msg = f"{source}: weights do not fit the network: {'; '.join(problems)}."
        raise DataError(msg)
