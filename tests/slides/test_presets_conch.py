"""CONCH v1 (through a stand-in ``conch`` package) and CONCH v1.5 (built from timm)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch import nn

from tiahnm.encoders.build import build_encoder
from tiahnm.encoders.builtin_presets import builtin_presets
from tiahnm.encoders.presets import EncoderPreset
from tiahnm.errors import DataError

PRESETS = {p.name: p for p in builtin_presets()}


class FakeCoCa(nn.Module):
    """Stands in for ``conch.open_clip_custom.coca_model.CoCa``: records its calls.

    ``encode_image`` gives a different width with the contrastive projection and
    unit-norm rows with ``normalize``, so a wrong call changes the features.
    """

    built: list[dict] = []
    calls: list[dict] = []

    def __init__(self, embed_dim: int, vision_cfg: dict, **rest: object) -> None:
        super().__init__()
        FakeCoCa.built.append(
            {"embed_dim": embed_dim, "vision_cfg": vision_cfg, **rest}
        )
        self.visual = nn.Linear(3, embed_dim)
        self.text = nn.Linear(4, 4)  # the checkpoint holds the text tower too
        self.proj = nn.Linear(embed_dim, 7, bias=False)

    def encode_image(self, images, normalize=True, proj_contrast=True):
        FakeCoCa.calls.append({"normalize": normalize, "proj_contrast": proj_contrast})
        feats = self.visual(images.mean(dim=(2, 3)))
        if proj_contrast:
            feats = self.proj(feats)
        return nn.functional.normalize(feats, dim=-1) if normalize else feats


@pytest.fixture
def fake_conch(tmp_path, monkeypatch):
    """A ``conch`` package in ``sys.modules`` with the model config in CFG_DIR."""
    cfg_dir = tmp_path / "model_configs"
    cfg_dir.mkdir()
    config = {"embed_dim": 512, "vision_cfg": {"image_size": 448}, "custom_text": True}
    (cfg_dir / "conch_ViT-B-16.json").write_text(json.dumps(config))
    pkg = types.ModuleType("conch")
    sub = types.ModuleType("conch.open_clip_custom")
    factory = types.ModuleType("conch.open_clip_custom.factory")
    factory.CFG_DIR = cfg_dir
    coca = types.ModuleType("conch.open_clip_custom.coca_model")
    coca.CoCa = FakeCoCa
    pkg.open_clip_custom, sub.factory, sub.coca_model = sub, factory, coca
    for module in (pkg, sub, factory, coca):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    FakeCoCa.built.clear()
    FakeCoCa.calls.clear()
    return cfg_dir


def test_conch_v1_builds_coca_from_the_package_config_and_calls_encode_image(
    fake_conch, tmp_path
):
    torch.manual_seed(0)
    ref = FakeCoCa(512, {"image_size": 448})
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "pytorch_model.bin")
    FakeCoCa.built.clear()
    info = build_encoder("conch_v1", weights=str(tmp_path))
    # the package's config, without the custom_text flag create_model drops
    assert FakeCoCa.built == [{"embed_dim": 512, "vision_cfg": {"image_size": 448}}]
    assert info.out_dim == 512 and info.card["pooling"] == "encode_image"
    x = torch.rand(2, 3, 448, 448)
    FakeCoCa.calls.clear()
    with torch.inference_mode():
        got = info.module.net(x)
        want = ref.visual(x.mean(dim=(2, 3)))  # before projection, not normalised
    assert FakeCoCa.calls == [{"normalize": False, "proj_contrast": False}]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    prep = info.preprocessing
    assert (prep.resize_size, prep.crop_size, prep.interpolation) == (
        448,
        448,
        "bicubic",
    )
    assert prep.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_conch_v1_checks_width_and_keys(fake_conch, tmp_path):
    with pytest.raises(DataError, match=r"missing keys.*visual\.weight"):
        torch.save({"text.weight": torch.zeros(4, 4)}, tmp_path / "pytorch_model.bin")
        build_encoder("conch_v1", weights=str(tmp_path))
    config = {"embed_dim": 256, "vision_cfg": {}, "custom_text": True}
    (fake_conch / "conch_ViT-B-16.json").write_text(json.dumps(config))
    with pytest.raises(
        DataError, match=r"shape \(1, 256\), the published width is 512"
    ):
        build_encoder("conch_v1", weights="random-init")


def _small_v15() -> EncoderPreset:
    """CONCH v1.5 with one trunk block (same layout, fast enough for CI)."""
    preset = PRESETS["conch_v15"]
    return EncoderPreset(**{**preset.__dict__, "kwargs": {**preset.kwargs, "depth": 1}})


def test_conch_v15_checkpoint_at_another_grid_is_resampled_as_trident(tmp_path):
    from timm.layers import resample_abs_pos_embed

    preset = _small_v15()
    torch.manual_seed(0)
    backbone, ref = preset.build_network()
    assert backbone.trunk.pos_embed.shape == (1, 1 + 14 * 14, 1024)
    state = backbone.state_dict()
    state["trunk.pos_embed"] = torch.randn(1, 1 + 28 * 28, 1024) * 0.02
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    # TRIDENT: resize_pos_embed -> timm's resample, bilinear, no antialias
    want_pos = resample_abs_pos_embed(
        state["trunk.pos_embed"], new_size=[14, 14], num_prefix_tokens=1,
        interpolation="bilinear", antialias=False,
    )  # fmt: skip
    ref.model.load_state_dict({**state, "trunk.pos_embed": want_pos}, strict=True)
    encoder = preset(weights=str(tmp_path))
    assert encoder.out_dim == 768
    x = torch.rand(1, 3, 448, 448)
    with torch.inference_mode():
        torch.testing.assert_close(encoder.net(x), ref.eval()(x), rtol=0, atol=0)


def test_conch_v15_tokens_follow_timm_at_the_native_grid():
    torch.manual_seed(0)
    backbone, _ = _small_v15().build_network()
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        ours = backbone.tokens(x)
        timm_tokens = backbone.trunk.forward_features(x)
        big = backbone.tokens(torch.rand(1, 3, 448, 448))
    torch.testing.assert_close(ours, timm_tokens, rtol=0, atol=1e-6)
    assert big.shape == (1, 1 + 28 * 28, 1024)
