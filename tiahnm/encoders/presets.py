"""Named encoder presets: a published pathology model, built exactly as published.

A preset (:class:`EncoderPreset`) is the whole model card of one encoder: the
architecture and its keyword arguments, the input pipeline (resize, crop,
interpolation, mean/std), the pooling rule, the output width, the recommended
resolution and patch size, the weight files and how their keys map onto the
network, the licence and whether the weights are gated.

Presets register through the ordinary encoder hook: the preset object *is* the
factory, so a third-party package adds a model with
``register("my_model", EncoderPreset(...))`` and ``tiahnm encoders`` lists it.

Weights come only from local files (never a download):

* a file (``pytorch_model.bin``, ``model.safetensors``, ``*.pth``);
* a folder holding one of the preset's weight files (a Hugging Face snapshot
  folder, or a ``models--org--name`` cache folder);
* ``hf-cache``: the preset's files in an already-filled Hugging Face cache, looked
  up with ``huggingface_hub.try_to_load_from_cache`` (which never contacts the hub;
  set ``HF_HUB_OFFLINE=1`` so that nothing else does either);
* ``random-init``: the architecture untrained (tests, benchmarks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tiahnm.encoders.base import (
    RANDOM_INIT,
    EncoderModule,
    Preprocessing,
    load_state_dict_file,
    load_weights,
    sha256_file,
)
from tiahnm.errors import ConfigError, DataError

#: The ``weights`` value that reads the preset's files from the local HF cache.
HF_CACHE = "hf-cache"


@dataclass(frozen=True)
class EncoderPreset:
    """A published encoder: architecture, preprocessing, pooling and weights.

    Attributes:
        name (str): Registry name (``uni``, ``virchow2`` ...).
        title (str): The model's published name.
        builder (str): Key of :data:`tiahnm.encoders.preset_archs.BUILDERS`.
        arch (str): Architecture passed to the builder (timm name, transformers
            class ...).
        kwargs (Mapping): Builder keyword arguments (``"layer:SwiGLUPacked"``
            strings name classes).
        pooling (str): ``cls``, ``cls+mean``, ``pooler``, ``avg`` or
            ``encode_image``.
        out_dim (int): Published feature width, checked after building.
        mean (tuple[float, ...]): Normalisation mean (0-1 scale).
        std (tuple[float, ...]): Normalisation std.
        resize_size (int | None): torchvision ``Resize`` (shorter side).
        crop_size (int | None): torchvision ``CenterCrop``.
        interpolation (str): ``bilinear`` or ``bicubic``.
        mpp (float): Recommended micrometres per pixel.
        patch_px (int): Recommended patch size at ``mpp``.
        weight_files (tuple[str, ...]): Accepted weight file names, preferred first.
        hf_repo (str): Hugging Face repository (or ``""``).
        source_url (str): Where the weights are published.
        licence (str): Licence of the weights (model card).
        gated (bool): Whether the weights need an access request.
        n_params (int): Published parameter count (0: none published).
        params_note (str): What the count covers and where it is published.
        ignore_prefixes (tuple[str, ...]): Checkpoint keys that may be dropped.
        drop_keys (str): Regex of checkpoint keys to drop (buffers, masks).
        key_filter (str): ``""``, ``"timm_swin"`` (old-timm Swin layout) or
            ``"trunk_pos_embed"`` (resample ``trunk.pos_embed`` to the built grid,
            bilinear, as TRIDENT loads CONCH v1.5).
        count_module (str): Submodule the published parameter count covers
            (``"visual"``: CONCH's image tower); ``""``: the whole backbone.
        requires (str): How to install a package the builder needs ("" if none).
        notes (str): Anything a user must know.
    """

    name: str
    title: str
    builder: str
    arch: str
    kwargs: Mapping[str, Any]
    pooling: str
    out_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int | None
    crop_size: int | None
    interpolation: str
    mpp: float
    patch_px: int
    weight_files: tuple[str, ...]
    hf_repo: str
    source_url: str
    licence: str
    gated: bool
    n_params: int
    params_note: str
    ignore_prefixes: tuple[str, ...] = ()
    drop_keys: str = ""
    key_filter: str = ""
    count_module: str = ""
    requires: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        from tiahnm.encoders.preset_archs import BUILDERS, POOLINGS

        if self.builder not in BUILDERS:
            msg = f"preset {self.name!r}: builder {self.builder!r} is not one of {sorted(BUILDERS)}."
            raise ConfigError(msg)
        if self.pooling not in POOLINGS:
            msg = f"preset {self.name!r}: pooling {self.pooling!r} is not one of {POOLINGS}."
            raise ConfigError(msg)
        if not self.weight_files:
            msg = f"preset {self.name!r}: name at least one weight file."
            raise ConfigError(msg)
        self.preprocessing  # noqa: B018 - validates mean/std/sizes now

    @property
    def preprocessing(self) -> Preprocessing:
        """The preset's input pipeline."""
        return Preprocessing(
            input_size=self.crop_size or self.resize_size,
            mean=self.mean,
            std=self.std,
            resize_size=self.resize_size,
            crop_size=self.crop_size,
            interpolation=self.interpolation,
        )

    def card(self) -> dict[str, Any]:
        """The model card as a JSON-friendly dict (``tiahnm encoders --json``)."""
        return {
            "name": self.name,
            "title": self.title,
            "out_dim": self.out_dim,
            "n_params": self.n_params,
            "input": self.crop_size or self.resize_size,
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "pooling": self.pooling,
            "mpp": self.mpp,
            "patch_px": self.patch_px,
            "licence": self.licence,
            "gated": self.gated,
            "weight_files": list(self.weight_files),
            "hf_repo": self.hf_repo,
            "source_url": self.source_url,
            "requires": self.requires,
        }

    def how_to_get(self) -> str:
        """One sentence telling where the weight files come from."""
        gate = " (gated: request access on the model page first)" if self.gated else ""
        return (
            f"download {' or '.join(self.weight_files)} from {self.source_url}{gate} "
            "on a machine with internet and copy the file or folder here"
        )

    def build_network(self) -> tuple[nn.Module, nn.Module]:
        """``(backbone, encoder)`` without weights, on the current default device."""
        from tiahnm.encoders.preset_archs import BUILDERS

        return BUILDERS[self.builder](self.arch, self.kwargs, self.pooling)

    def __call__(
        self, *, weights: str | None = None, pooling: str | None = None
    ) -> EncoderModule:
        """Build the encoder with local weights (the registry factory).

        Args:
            weights (str | None): A weights file or folder, ``hf-cache`` or
                ``random-init``. Required.
            pooling (str | None): ``cls`` or ``cls+mean`` instead of the published
                rule, for ViT presets whose rule is one of these (the width
                halves or doubles accordingly); None keeps the published rule.

        Returns:
            EncoderModule: ``[B, 3, H, W] -> [B, out_dim]`` with the preset's
            preprocessing, its weights' SHA-256 and its card.

        Raises:
            ConfigError: No usable weights, or a package the preset needs is missing.
            DataError: The weights do not fit, or the output width is not
                ``out_dim``.
        """
        if pooling is not None and pooling != self.pooling:
            return self.with_pooling(pooling)(weights=weights)
        path = resolve_weights(self, weights)
        state = load_state_dict_file(path) if path is not None else None
        built = self.fitted_to(state) if state is not None else self
        backbone, net = built.build_network()
        if state is not None:
            self.load(backbone, state, source=path)
        encoder = EncoderModule(
            net,
            out_dim=self.out_dim,
            preprocessing=self.preprocessing,
            weights_sha256=sha256_file(path) if path is not None else RANDOM_INIT,
            spec=f"preset:{self.name}",
            card={"preset": self.name, "pooling": self.pooling, **self.card()},
        )
        check_out_dim(self, encoder.eval())
        return encoder

    def fitted_to(self, state: Mapping[str, torch.Tensor]) -> EncoderPreset:
        """This preset built at the position-embedding grid the checkpoint holds.

        ``transformers`` DINOv2 / ViT checkpoints keep the grid of their config's
        ``image_size`` (often 518) and interpolate it to the input at run time, as
        ``from_pretrained`` does; building at the checkpoint's grid reproduces that.
        Other builders are returned unchanged.
        """
        from dataclasses import replace

        pos = _strip_base_prefix(self, dict(state)).get(
            "embeddings.position_embeddings"
        )
        if self.builder != "transformers" or pos is None or pos.ndim != 3:
            return self
        side = round((pos.shape[1] - 1) ** 0.5)
        if side * side != pos.shape[1] - 1:
            return self
        image_size = side * int(self.kwargs["patch_size"])
        if image_size == self.kwargs.get("image_size"):
            return self
        return replace(self, kwargs={**self.kwargs, "image_size": image_size})

    def with_pooling(self, pooling: str) -> EncoderPreset:
        """This preset with the ``cls`` / ``cls+mean`` rule swapped.

        Raises:
            ConfigError: The preset's rule or ``pooling`` is not ``cls``/``cls+mean``.
        """
        from dataclasses import replace

        swappable = ("cls", "cls+mean")
        if pooling not in swappable or self.pooling not in swappable:
            msg = (
                f"preset {self.name!r}: encoder.options.pooling may swap 'cls' and "
                f"'cls+mean' only (published rule {self.pooling!r}, got {pooling!r})."
            )
            raise ConfigError(msg)
        dim = self.out_dim * 2 if pooling == "cls+mean" else self.out_dim // 2
        return replace(self, pooling=pooling, out_dim=dim)

    def load(
        self, backbone: nn.Module, state: Mapping[str, torch.Tensor], *, source: Any
    ) -> None:
        """Load a checkpoint in the published key layout into ``backbone``.

        Raises:
            DataError: Keys or shapes do not match (names them and how to obtain the
                right file).
        """
        state = remap_keys(self, dict(state), backbone)
        try:
            load_weights(
                backbone, state, source=source, ignore_prefixes=self.ignore_prefixes
            )
        except DataError as exc:
            msg = f"{exc} Expected the {self.title} checkpoint: {self.how_to_get()}."
            raise DataError(msg) from None


def remap_keys(
    preset: EncoderPreset, state: dict[str, torch.Tensor], backbone: nn.Module
) -> dict[str, torch.Tensor]:
    """Apply the preset's key rules (dropped keys, old-timm Swin layout, prefix)."""
    state = _strip_base_prefix(preset, state)
    if preset.drop_keys:
        pattern = re.compile(preset.drop_keys)
        state = {k: v for k, v in state.items() if not pattern.search(k)}
    if preset.key_filter == "timm_swin":
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, backbone)
    if preset.key_filter == "trunk_pos_embed":
        state = _resample_trunk_pos_embed(state, backbone)
    return state


def _resample_trunk_pos_embed(
    state: dict[str, torch.Tensor], backbone: nn.Module
) -> dict[str, torch.Tensor]:
    """``trunk.pos_embed`` resampled to the trunk's grid (bilinear, no antialias)."""
    pos = state.get("trunk.pos_embed")
    trunk = getattr(backbone, "trunk", None)
    if pos is None or trunk is None or pos.shape == trunk.pos_embed.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    resized = resample_abs_pos_embed(
        pos,
        new_size=list(trunk.patch_embed.grid_size),
        num_prefix_tokens=int(trunk.num_prefix_tokens),
        interpolation="bilinear",
        antialias=False,
        verbose=False,
    )
    return {**state, "trunk.pos_embed": resized}


def counted_parameters(preset: EncoderPreset, backbone: nn.Module) -> int:
    """Parameters of the part of ``backbone`` the published count covers."""
    part = (
        backbone.get_submodule(preset.count_module) if preset.count_module else backbone
    )
    return sum(p.numel() for p in part.parameters())


def _strip_base_prefix(
    preset: EncoderPreset, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Drop a ``transformers`` base-model prefix (``vit.``, ``dinov2.``) if present.

    Checkpoints saved from a task model (``ViTForImageClassification``...) prefix
    the backbone's keys; ``from_pretrained`` strips it, and so does this.
    """
    if preset.builder != "transformers":
        return state
    prefixes = ("vit.", "dinov2.", "model.")
    for prefix in prefixes:
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def check_out_dim(preset: EncoderPreset, encoder: nn.Module) -> None:
    """One forward pass of a blank patch; the width must be ``preset.out_dim``.

    Raises:
        DataError: The encoder gives another width.
    """
    size = preset.crop_size or preset.resize_size or preset.patch_px
    device = next(encoder.parameters()).device
    with torch.inference_mode():
        out = encoder(torch.zeros(1, 3, size, size, device=device))
    if tuple(out.shape) != (1, preset.out_dim):
        msg = (
            f"preset {preset.name!r}: the network gives features of shape "
            f"{tuple(out.shape)}, the published width is {preset.out_dim}."
        )
        raise DataError(msg)


def resolve_weights(preset: EncoderPreset, weights: str | None) -> Path | None:
    """The weights file for ``weights`` (file, folder, ``hf-cache``) or None.

    Raises:
        ConfigError: Missing, or no expected file found (names the files looked for
            and how to obtain them).
    """
    hint = (
        f"tiahnm never downloads weights: {preset.how_to_get()}, then pass "
        f"--weights FILE_OR_FOLDER, or --weights {HF_CACHE} to use a filled Hugging "
        f"Face cache (with HF_HUB_OFFLINE=1), or --weights {RANDOM_INIT}."
    )
    if weights is None or str(weights).strip() == "":
        msg = f"preset {preset.name!r} needs local weights. {hint}"
        raise ConfigError(msg)
    if str(weights) == RANDOM_INIT:
        return None
    if str(weights) == HF_CACHE:
        found = _from_hf_cache(preset)
        where = f"the Hugging Face cache (repo {preset.hf_repo or 'none'})"
    else:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        found = _from_folder(preset, path) if path.is_dir() else None
        where = f"{path}" if path.is_dir() else f"{path} (not found)"
    if found is None:
        msg = (
            f"preset {preset.name!r}: none of {', '.join(preset.weight_files)} in "
            f"{where}. {hint}"
        )
        raise ConfigError(msg)
    return found


def _from_folder(preset: EncoderPreset, folder: Path) -> Path | None:
    """A weight file in ``folder``, its ``snapshots/*`` (HF cache layout) first."""
    candidates = [folder, *sorted((folder / "snapshots").glob("*"))[::-1]]
    for base in candidates:
        for name in preset.weight_files:
            if (base / name).is_file():
                return base / name
    return None


def _from_hf_cache(preset: EncoderPreset) -> Path | None:
    if not preset.hf_repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for name in preset.weight_files:
        hit = try_to_load_from_cache(preset.hf_repo, name)
        if isinstance(hit, str):
            return Path(hit)
    return None


def registered_presets() -> dict[str, EncoderPreset]:
    """Every registered encoder that is a preset (built-in or from a plugin)."""
    from tiahnm.plugins import get_registry

    registry = get_registry("encoder")
    return {
        name: entry.factory
        for name, entry in registry.items()
        if isinstance(entry.factory, EncoderPreset)
    }
