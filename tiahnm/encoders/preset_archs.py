"""The architectures behind the named encoder presets, built without weights.

Each builder returns ``(backbone, wrapper)``: ``backbone`` is the network whose
``state_dict()`` has the published key layout (weights are loaded into it), and
``wrapper`` maps ``[B, 3, H, W]`` to ``[B, D]`` with the preset's pooling rule.
Class-valued keyword arguments (timm's ``SwiGLUPacked``, ``torch.nn.SiLU``) are
named by strings in the presets and resolved here from a fixed table, so a preset
never runs code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tiahnm.errors import ConfigError

#: Pooling rules: how the backbone output becomes one vector per patch.
POOLINGS = ("cls", "cls+mean", "pooler", "avg", "encode_image")


def _layer(name: str) -> Any:
    """Resolve a class named in a preset's kwargs (the only names allowed)."""
    import timm.layers

    table = {
        "SwiGLUPacked": timm.layers.SwiGLUPacked,
        "SiLU": nn.SiLU,
        "GELU": nn.GELU,
    }
    if name not in table:
        msg = f"preset kwargs: unknown layer {name!r} (known: {', '.join(table)})."
        raise ConfigError(msg)
    return table[name]


def resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Preset kwargs with ``"layer:Name"`` strings replaced by the classes."""
    return {
        k: _layer(v[len("layer:") :])
        if isinstance(v, str) and v.startswith("layer:")
        else v
        for k, v in kwargs.items()
    }


def pool_tokens(tokens: torch.Tensor, pooling: str, n_prefix: int) -> torch.Tensor:
    """``[B, T, D]`` tokens to ``[B, D]`` (``cls``) or ``[B, 2D]`` (``cls+mean``).

    ``cls+mean`` concatenates the class token with the mean of the patch tokens
    after the ``n_prefix`` prefix tokens (class and register tokens), as Virchow,
    Virchow2 and Midnight publish their embeddings.
    """
    cls = tokens[:, 0]
    if pooling == "cls":
        return cls
    if pooling == "cls+mean":
        return torch.cat([cls, tokens[:, n_prefix:].mean(dim=1)], dim=-1)
    msg = f"pooling {pooling!r} does not apply to token outputs."
    raise ConfigError(msg)


class TimmTokens(nn.Module):
    """A timm ViT: ``forward_features`` (final norm applied), then the pooling rule."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, D]``."""
        tokens = self.model.forward_features(x)
        return pool_tokens(tokens, self.pooling, int(self.model.num_prefix_tokens))


class HFTokens(nn.Module):
    """A Hugging Face ``transformers`` vision model and its pooling rule."""

    def __init__(self, model: nn.Module, pooling: str, n_prefix: int) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.n_prefix = n_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, D]``."""
        out = self.model(pixel_values=x)
        if self.pooling == "pooler":
            return out.pooler_output
        return pool_tokens(out.last_hidden_state, self.pooling, self.n_prefix)


class PooledCNN(nn.Module):
    """A CNN giving ``[B, D, h, w]`` maps, mean-pooled to ``[B, D]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, D]``."""
        return self.model(x).mean(dim=(2, 3))


class ResNet50Trunc(nn.Module):
    """CLAM's ``resnet50_trunc``: torchvision ResNet-50 up to ``layer3`` (1024-d).

    The submodules keep torchvision's names, so a torchvision ResNet-50 state dict
    loads after dropping ``layer4.*`` and ``fc.*``.
    """

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, 1024, h, w]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class ConvStem(nn.Module):
    """CTransPath's convolutional patch embedding, for timm 1.x Swin (NHWC output).

    Two stride-2 3x3 conv + BN + ReLU stages and a 1x1 projection, as in the
    TransPath paper; the layer names match the published checkpoint
    (``patch_embed.proj.{0,1,3,4,6}``, ``patch_embed.norm``).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Callable[..., nn.Module] | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            msg = "ConvStem needs patch_size 4 and embed_dim divisible by 8."
            raise ConfigError(msg)
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _stage in range(2):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, H/4, W/4, C]``."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def build_timm(
    arch: str, kwargs: Mapping[str, Any], pooling: str
) -> tuple[nn.Module, nn.Module]:
    """A timm model (``pretrained=False``, ``num_classes=0``) and its token pooling."""
    import timm

    net = timm.create_model(arch, pretrained=False, **resolve_kwargs(kwargs))
    return net, TimmTokens(net, pooling)


def build_ctranspath(
    arch: str, kwargs: Mapping[str, Any], pooling: str
) -> tuple[nn.Module, nn.Module]:
    """CTransPath / CHIEF: timm Swin-T with the ConvStem, global average pooling."""
    import timm

    net = timm.create_model(
        arch, pretrained=False, embed_layer=ConvStem, **resolve_kwargs(kwargs)
    )
    return net, _Forward(net)


class _Forward(nn.Module):
    """The backbone's own pooled forward (``num_classes=0``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, D]``."""
        return self.model(x)


def build_resnet50_trunc(
    arch: str, kwargs: Mapping[str, Any], pooling: str
) -> tuple[nn.Module, nn.Module]:
    """CLAM's truncated ResNet-50 with global average pooling."""
    net = ResNet50Trunc()
    return net, PooledCNN(net)


def build_transformers(
    arch: str, kwargs: Mapping[str, Any], pooling: str
) -> tuple[nn.Module, nn.Module]:
    """A ``transformers`` model class (``arch``) from a config built from ``kwargs``.

    The config is written in the preset (no ``config.json`` and no remote code is
    read), so the architecture is fixed by tiahnm, not by a downloaded file.
    """
    import transformers

    model_cls = getattr(transformers, arch)
    config = model_cls.config_class(**dict(kwargs))
    extra = {"add_pooling_layer": False} if arch == "ViTModel" else {}
    net = model_cls(config, **extra)
    n_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return net, HFTokens(net, pooling, n_prefix)


class EncodeImage(nn.Module):
    """CONCH v1: ``model.encode_image(x, proj_contrast=False, normalize=False)``.

    The image embedding before the contrastive projection (512-d), as TRIDENT
    extracts CONCH v1 features.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, D]``."""
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


def build_conch(
    arch: str, kwargs: Mapping[str, Any], pooling: str
) -> tuple[nn.Module, nn.Module]:
    """CONCH v1 through its own package: ``CoCa`` from the package's model config.

    As ``conch.open_clip_custom.create_model`` builds it (the JSON config of
    ``arch`` without its ``custom_text`` flag), without reading a checkpoint: the
    weights are loaded strictly by the preset (the package's own loader ignores
    missing keys).

    Raises:
        ConfigError: The ``conch`` package (not on PyPI) is not installed.
    """
    import json
    from pathlib import Path

    try:
        from conch.open_clip_custom import factory
        from conch.open_clip_custom.coca_model import CoCa
    except ImportError:
        msg = (
            "preset 'conch_v1' needs the CONCH package, which is not on PyPI: "
            "pip install git+https://github.com/Mahmoodlab/CONCH.git "
            '(or pip install -e ".[conch]")'
        )
        raise ConfigError(msg) from None
    config = json.loads((Path(factory.CFG_DIR) / f"{arch}.json").read_text())
    config.pop("custom_text", None)
    net = CoCa(**config, **dict(kwargs))
    return net, EncodeImage(net)


class AttentionalPooler(nn.Module):
    """Cross-attention of learned queries over the tokens (CoCa / CONCH pooler).

    Parameter names follow the CONCH v1.5 checkpoint (``query``, ``ln_k``,
    ``ln_q``, ``to_q``, ``to_kv``, ``to_out``; no biases).
    """

    def __init__(
        self, d_model: int, context_dim: int, n_head: int, n_queries: int
    ) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` tokens to ``[B, n_queries, d_model]``."""
        b = x.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        out = attn.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).flatten(2))


def dino_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINO/iBOT-style interpolation of ``[1, 1 + N, C]`` to a ``rows x cols`` grid.

    Bicubic with the scale factor ``(grid + 0.1) / sqrt(N)`` (no antialiasing), as
    the iBOT ViT of CONCH v1.5 does at run time; unchanged for its own grid.
    """
    n = pos_embed.shape[1] - 1
    side = int(n**0.5)
    if rows * cols == n and rows == cols:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(
        grid,
        scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
        mode="bicubic",
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


class ConchV15Tower(nn.Module):
    """CONCH v1.5's vision tower (TITAN's patch encoder), built from timm.

    A timm ViT-L/16 trunk (layer scale 1.0, 224 px position grid interpolated to
    the input DINO-style), an attentional pooler with one query (768-d) and a
    final LayerNorm; the key layout of ``pytorch_model_vision.bin``
    (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``).
    """

    def __init__(self, arch: str, kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        import timm

        self.trunk = timm.create_model(arch, pretrained=False, **resolve_kwargs(kwargs))
        width = int(self.trunk.embed_dim)
        self.attn_pool_contrast = AttentionalPooler(768, width, 8, 1)
        self.ln_contrast = nn.LayerNorm(768)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's normed tokens ``[B, 1 + h*w, C]``."""
        trunk = self.trunk
        patches = trunk.patch_embed(x)  # NHWC (dynamic_img_size)
        rows, cols = patches.shape[1], patches.shape[2]
        cls = trunk.cls_token.expand(x.shape[0], -1, -1)
        seq = torch.cat([cls, patches.flatten(1, 2)], dim=1)
        seq = seq + dino_pos_embed(trunk.pos_embed, rows, cols)
        return trunk.norm(trunk.blocks(trunk.norm_pre(seq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` to ``[B, 768]``."""
        return self.ln_contrast(self.attn_pool_contrast(self.tokens(x))[:, 0])


def build_conch_v15(
    arch: str, kwargs: Mapping[str, Any], pooling: str
) -> tuple[nn.Module, nn.Module]:
    """CONCH v1.5's vision tower (:class:`ConchV15Tower`); no package needed."""
    net = ConchV15Tower(arch, kwargs)
    return net, _Forward(net)


BUILDERS: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {
    "timm": build_timm,
    "ctranspath": build_ctranspath,
    "resnet50_trunc": build_resnet50_trunc,
    "transformers": build_transformers,
    "conch": build_conch,
    "conch_v15": build_conch_v15,
}
