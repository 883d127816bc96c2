"""Named encoder presets: published sizes, key layouts, preprocessing, weights."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tiahnm.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from tiahnm.encoders.build import build_encoder
from tiahnm.encoders.builtin_presets import builtin_presets
from tiahnm.encoders.presets import (
    EncoderPreset,
    counted_parameters,
    registered_presets,
)
from tiahnm.errors import ConfigError, DataError

PRESETS = {p.name: p for p in builtin_presets()}
OWN_PACKAGE = {"conch_v1"}  # needs a package that is not on PyPI
SLIDES = Path(__file__).parents[2] / ".." / "shared" / "data" / "slides"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_on_meta_with_published_size(name):
    if name in OWN_PACKAGE:
        pytest.importorskip(
            "conch.open_clip_custom", reason="the CONCH package is not on PyPI"
        )
    preset = PRESETS[name]
    with torch.device("meta"):
        backbone, net = preset.build_network()
        size = preset.crop_size or preset.resize_size or preset.patch_px
        out = net(torch.empty(2, 3, size, size))
    n = counted_parameters(preset, backbone)
    # published counts are rounded to 2-3 significant digits ("1.1B", "632M")
    assert abs(n - preset.n_params) / preset.n_params < 0.04, (n, preset.n_params)
    assert tuple(out.shape) == (2, preset.out_dim)


@pytest.mark.parametrize("name", sorted(OWN_PACKAGE))
def test_presets_with_own_package_name_the_install(name, monkeypatch):
    for module in ("conch", "conch.open_clip_custom"):
        monkeypatch.setitem(sys.modules, module, None)  # absent even if installed
    with pytest.raises(ConfigError, match=r"not on PyPI: pip install git\+https://"):
        PRESETS[name].build_network()


def test_every_builtin_preset_is_registered_through_the_hook():
    assert set(registered_presets()) == set(PRESETS)


def _old_timm_swin_layout(state: dict, backbone: torch.nn.Module) -> dict:
    """What the CTransPath checkpoint holds: timm 0.5 Swin keys, attn masks, head."""
    out = {}
    for k, v in state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else k] = v
    for name, module in backbone.named_modules():
        mask = getattr(module, "attn_mask", None)
        if isinstance(mask, torch.Tensor):
            out[f"{name}.attn_mask"] = mask.clone()
    out["head.weight"] = torch.zeros(2, 768)
    out["head.bias"] = torch.zeros(2)
    return {"model": out}


@pytest.mark.parametrize(
    ("name", "file", "layout"),
    [
        ("kaiko_vits16", "model.safetensors", "plain"),
        ("ctranspath", "ctranspath.pth", "old_swin"),
        ("resnet50_trunc", "resnet50-19c8e357.pth", "torchvision"),
        ("hibou_b", "model.safetensors", "hf_518"),
    ],
)
def test_published_key_layout_loads_with_identical_outputs(
    tmp_path, name, file, layout
):
    preset = PRESETS[name]
    torch.manual_seed(1)
    if (
        layout == "hf_518"
    ):  # HF DINOv2 configs keep a 518 px grid, interpolated at run time
        preset = EncoderPreset(
            **{**preset.__dict__, "kwargs": {**preset.kwargs, "image_size": 518}}
        )
    backbone, ref = preset.build_network()
    state = backbone.state_dict()
    if layout == "hf_518":
        state = {f"dinov2.{k}": v for k, v in state.items()}  # a task model's prefix
    if layout == "old_swin":
        saved = _old_timm_swin_layout(state, backbone)
        assert any(k.endswith("attn_mask") for k in saved["model"])
        torch.save(saved, tmp_path / file)
    elif layout == "torchvision":
        import torchvision

        full = torchvision.models.resnet50(weights=None).state_dict()
        full.update(state)  # layer4 and fc as in the published file
        torch.save(full, tmp_path / file)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / file)
    info = build_encoder(name, weights=str(tmp_path), seed=123)  # a folder
    assert info.out_dim == preset.out_dim
    if layout == "hf_518":
        assert info.module.net.model.config.image_size == 518
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(info.module(x), ref.eval()(x), rtol=0, atol=0)


def test_missing_weights_name_the_expected_files(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_encoder("uni", weights=str(tmp_path))
    text = str(err.value)
    assert "pytorch_model.bin" in text and "huggingface.co/MahmoodLab/UNI" in text
    assert "gated" in text and "never downloads" in text
    with pytest.raises(ConfigError, match="needs local weights"):
        build_encoder("uni")


def test_mismatching_weights_name_the_keys_and_the_source(tmp_path):
    state = {"cls_token": torch.zeros(1, 1, 384), "teacher.bogus": torch.zeros(3)}
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(DataError) as err:
        build_encoder("kaiko_vits16", weights=str(tmp_path / "other.pth"))
    text = str(err.value)
    assert "other.pth" in text and "missing keys" in text and "pos_embed" in text
    assert "unexpected keys" in text and "teacher.bogus" in text
    assert "1aurent/vit_small_patch16_224" in text


def test_hf_cache_is_read_offline(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    preset = PRESETS["kaiko_vits16"]
    torch.manual_seed(0)
    backbone, _ = preset.build_network()
    snap = (
        tmp_path
        / f"models--{preset.hf_repo.replace('/', '--')}"
        / "snapshots"
        / "abc123"
    )
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    save_file(backbone.state_dict(), snap / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    info = build_encoder("kaiko_vits16", weights="hf-cache")
    assert info.weights_sha256 != "random-init"
    # the cache folder itself works too (snapshots/*)
    again = build_encoder("kaiko_vits16", weights=str(snap.parents[1]))
    assert again.state_sha256 == info.state_sha256


def _real_patches(size: int, n: int = 4) -> torch.Tensor:
    import openslide

    slide = openslide.OpenSlide(str(SLIDES / "CMU-1-Small-Region.svs"))
    out = []
    for i in range(n):
        region = slide.read_region(
            (300 + 400 * i, 500 + 300 * i), 0, (size, size + 20 * i % 40)
        )
        out.append(np.asarray(region.convert("RGB")))
    h = min(p.shape[0] for p in out)
    return torch.from_numpy(np.stack([p[:h] for p in out]))


@pytest.mark.shared_data
@pytest.mark.parametrize("size", [224, 256, 300])
def test_preprocessing_equals_torchvision_pipeline_on_real_patches(size):
    if not (SLIDES / "CMU-1-Small-Region.svs").is_file():
        pytest.skip("../shared/data/slides is absent")
    from torchvision.transforms import v2

    batch = _real_patches(size)
    seen = set()
    for preset in PRESETS.values():
        prep = preset.preprocessing
        if prep in seen or not prep.torchvision_mode:
            continue
        seen.add(prep)
        steps = []
        if prep.resize_size:
            mode = v2.InterpolationMode(prep.interpolation)
            steps.append(
                v2.Resize(prep.resize_size, interpolation=mode, antialias=True)
            )
        if prep.crop_size:
            steps.append(v2.CenterCrop(prep.crop_size))
        ref = v2.Compose(
            [
                *steps,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(prep.mean, prep.std),
            ]
        )
        want = torch.stack([ref(p.permute(2, 0, 1)) for p in batch])
        got = prep(batch)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-6, preset.name
    assert len(seen) >= 8


def test_timm_generic_path_never_guesses_normalisation(tmp_path):
    with pytest.raises(ConfigError, match="give mean and std"):
        build_encoder("timm:test_vit", weights="random-init")
    tagged = build_encoder("timm:test_vit.r160_in1k", weights="random-init")
    import timm

    cfg = timm.create_model("test_vit.r160_in1k", pretrained=False).pretrained_cfg
    assert tagged.preprocessing.mean == tuple(cfg["mean"])
    dinov2 = build_encoder(
        "timm:vit_small_patch14_dinov2",
        weights="random-init",
        options={
            "model_kwargs": {"img_size": 224},
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
    )
    assert dinov2.preprocessing.input_size == 224  # not the architecture's 518


def test_third_party_preset_through_the_hook(monkeypatch):
    from tiahnm.hookspecs import hookimpl
    from tiahnm.plugins import get_plugin_manager, reset_plugin_manager

    mine = EncoderPreset(
        **{**PRESETS["kaiko_vits16"].__dict__, "name": "my_vit", "title": "Mine"}
    )

    class Plugin:
        @hookimpl
        def tiahnm_register_encoders(self, register):
            register("my_vit", mine, description="preset: Mine")

    reset_plugin_manager()
    try:
        get_plugin_manager().register(Plugin(), name="mine")
        from tiahnm.cli import cli

        result = CliRunner().invoke(cli, ["encoders", "--json"])
        assert result.exit_code == 0, result.output
        cards = {c["name"]: c for c in json.loads(result.output)}
        assert cards["my_vit"]["title"] == "Mine" and "uni" in cards
        assert cards["uni"]["out_dim"] == 1024 and cards["uni"]["gated"] is True
        table = CliRunner().invoke(cli, ["encoders"])
        assert (
            table.exit_code == 0
            and "virchow2" in table.output
            and "2560" in table.output
        )
    finally:
        reset_plugin_manager()


@pytest.mark.shared_data
@pytest.mark.slow
def test_extract_uni_random_init_records_the_preset(tmp_path):
    if not (SLIDES / "CMU-1-Small-Region.svs").is_file():
        pytest.skip("../shared/data/slides is absent")
    import h5py

    from tiahnm.cli import cli

    out = tmp_path / "feats"
    result = CliRunner().invoke(
        cli,
        ["extract", "--img-input", str(SLIDES / "CMU-1-Small-Region.svs"), "--output-path", str(out),
         "--encoder", "uni", "--weights", "random-init", "--resolution", "2", "--batch-size", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with h5py.File(out / "CMU-1-Small-Region.h5") as f:
        assert f["features"].shape[1] == 1024 and f["features"].shape[0] >= 1
        assert f.attrs["encoder"] == "uni"
        prep = json.loads(f.attrs["preprocessing"])
        card = json.loads(f.attrs["encoder_card"])
    assert prep["mean"] == list(IMAGENET_MEAN) and prep["std"] == list(IMAGENET_STD)
    assert prep["resize_size"] == 224 and prep["crop_size"] == 224
    assert card["preset"] == "uni" and card["pooling"] == "cls"


def test_pooling_option_swaps_cls_and_cls_mean():
    info = build_encoder(
        "kaiko_vits16", weights="random-init", options={"pooling": "cls+mean"}
    )
    assert info.out_dim == 768 and info.card["pooling"] == "cls+mean"
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        tokens = info.module.net.model.forward_features(x)
        want = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
        torch.testing.assert_close(info.module(x), want)
    with pytest.raises(ConfigError, match="may swap 'cls' and 'cls\\+mean' only"):
        build_encoder("hibou_b", weights="random-init", options={"pooling": "cls"})


@pytest.mark.shared_data
def test_extract_without_weights_is_a_usage_error(tmp_path):
    if not (SLIDES / "CMU-1-Small-Region.svs").is_file():
        pytest.skip("../shared/data/slides is absent")
    from tiahnm.cli import cli

    args = ["extract", "--img-input", str(SLIDES / "CMU-1-Small-Region.svs")]
    result = CliRunner().invoke(
        cli, [*args, "--output-path", str(tmp_path), "--encoder", "uni"]
    )
    assert result.exit_code == 2, result.output
    assert "Error: preset 'uni' needs local weights" in result.output
    assert "pytorch_model.bin" in result.output


def test_timm_model_kwargs_name_layer_classes():
    info = build_encoder(
        "timm:vit_small_patch14_reg4_dinov2",
        weights="random-init",
        options={
            "model_kwargs": {
                "img_size": 56,
                "mlp_layer": "layer:SwiGLUPacked",
                "act_layer": "layer:SiLU",
            },
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        },
    )
    mlp = info.module.net.blocks[
        0
    ].mlp  # timm's SwiGLUPacked is GluMlp(gate_last=False)
    assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.act, torch.nn.SiLU)
    with pytest.raises(ConfigError, match="unknown layer 'Nope'"):
        build_encoder(
            "timm:test_vit",
            weights="random-init",
            options={
                "model_kwargs": {"act_layer": "layer:Nope"},
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
            },
        )


@pytest.mark.shared_data
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_pil_pipeline_differs_by_at_most_two_grey_levels(interpolation):
    """TRIDENT applies the transforms to PIL images (uint8 resampling)."""
    if not (SLIDES / "CMU-1-Small-Region.svs").is_file():
        pytest.skip("../shared/data/slides is absent")
    import torchvision.transforms as T
    from PIL import Image

    from tiahnm.encoders.base import Preprocessing

    mode = T.InterpolationMode(interpolation)
    prep = Preprocessing(
        mean=(0, 0, 0),
        std=(1, 1, 1),
        resize_size=224,
        crop_size=224,
        interpolation=interpolation,
    )
    pil = T.Compose(
        [T.Resize(224, interpolation=mode), T.CenterCrop(224), T.ToTensor()]
    )
    for size in (256, 300):
        batch = _real_patches(size)
        got = prep(batch)
        want = torch.stack([pil(Image.fromarray(p.numpy())) for p in batch])
        diff = (got - want).abs() * 255
        assert diff.max().item() <= 2 + 1e-4
        assert diff.mean().item() < 0.01


def test_a_bad_preset_is_refused_when_declared():
    base = PRESETS["kaiko_vits16"].__dict__
    with pytest.raises(ConfigError, match="pooling 'max' is not one of"):
        EncoderPreset(**{**base, "pooling": "max"})
    with pytest.raises(ConfigError, match="builder 'keras' is not one of"):
        EncoderPreset(**{**base, "builder": "keras"})
    with pytest.raises(ConfigError, match="std"):
        EncoderPreset(**{**base, "std": (0.5, 0.0, 0.5)})
