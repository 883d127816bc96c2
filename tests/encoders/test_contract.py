"""Contract tests run on every registered encoder (built-in, preset or plugin).

An encoder factory builds an ``nn.Module`` mapping ``[B, 3, H, W]`` images to
``[B, D]`` features, with the preprocessing it was trained with. Generic encoders are
built small (``RECIPES``) and must: give finite ``[B, out_dim]`` features, declare
their preprocessing, be deterministic in eval mode, pass gradients in training mode,
round-trip a state dict with identical outputs, and reject unknown options by name.
Named presets are checked without their (large) weights: their network builds on the
meta device with the declared width, their model card is complete, and building
without weights names how to obtain them. Every built-in must be covered.
"""

from __future__ import annotations

import pytest
import torch

from tiahnm.encoders.presets import EncoderPreset
from tiahnm.errors import ConfigError
from tiahnm.plugins import get_registry

# Small options for the generic encoders (random init: no weights on disk).
RECIPES: dict[str, dict] = {
    "small_cnn": {"out_dim": 16, "width": 4},
    "torchvision": {"model": "resnet18", "weights": "random-init"},
    "timm": {
        "model": "resnet18",
        "weights": "random-init",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    },
    "module": {
        "model": "torch.nn:Conv2d",
        "kwargs": {"in_channels": 3, "out_channels": 8, "kernel_size": 3},
    },
}
# Presets whose builder needs a package that is not on PyPI (tested in test_presets).
OWN_PACKAGE = {"conch_v1", "conch_v15"}
CARD_FIELDS = ("licence", "gated", "mpp", "patch_px", "out_dim", "weight_files")

REGISTRY = get_registry("encoder")
NAMES = sorted(REGISTRY)
PRESETS = sorted(n for n in NAMES if isinstance(REGISTRY[n].factory, EncoderPreset))
GENERIC = sorted(set(NAMES) & set(RECIPES))


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return REGISTRY.create(name, key="encoder.options", **RECIPES[name])


def test_every_builtin_encoder_is_covered():
    builtin = {n for n in NAMES if REGISTRY[n].package == "tiahnm"}
    assert builtin <= set(PRESETS) | set(GENERIC), builtin - set(PRESETS) - set(GENERIC)
    assert {"small_cnn", "timm", "torchvision", "module", "uni"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_named(name):
    with pytest.raises(ConfigError, match=r"encoder\.options\.no_such_option"):
        REGISTRY.create(name, key="encoder.options", no_such_option=1)


@pytest.mark.parametrize("name", GENERIC)
def test_features_are_finite_with_declared_width_and_preprocessing(name):
    enc = build(name).eval()
    with torch.no_grad():
        feats = enc(images())
    assert feats.dim() == 2 and feats.shape[0] == 2
    assert torch.isfinite(feats).all()
    assert feats.shape[1] == enc.out_dim
    prep = enc.preprocessing
    assert len(prep.mean) == len(prep.std) == 3
    assert all(s > 0 for s in prep.std)


@pytest.mark.parametrize("name", GENERIC)
def test_eval_is_deterministic_and_a_state_dict_round_trips(name, tmp_path):
    enc = build(name, seed=1).eval()
    x = images(seed=3)
    with torch.no_grad():
        first = enc(x)
        assert torch.equal(first, enc(x))
    torch.save(enc.state_dict(), tmp_path / "enc.pt")
    fresh = build(name, seed=2).eval()
    fresh.load_state_dict(torch.load(tmp_path / "enc.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(first, fresh(x))


@pytest.mark.parametrize("name", GENERIC)
def test_gradients_reach_the_parameters_in_training(name):
    enc = build(name).train()
    enc(images(4)).square().mean().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - OWN_PACKAGE))
def test_preset_builds_on_meta_with_its_width(name):
    preset = REGISTRY[name].factory
    with torch.device("meta"):
        _, net = preset.build_network()
        size = preset.crop_size or preset.resize_size or preset.patch_px
        out = net(torch.empty(1, 3, size, size))
    assert tuple(out.shape) == (1, preset.out_dim)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_card_is_complete_and_weights_are_required(name):
    preset = REGISTRY[name].factory
    card = preset.card()
    for field in CARD_FIELDS:
        assert field in card and card[field] not in (None, ""), (name, field)
    assert len(preset.mean) == len(preset.std) == 3
    with pytest.raises(ConfigError, match="weights"):
        REGISTRY.create(name, key="encoder.options")
