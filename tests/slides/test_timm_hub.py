"""``timm:hf-hub:ORG/NAME`` from a filled Hugging Face cache, with the hub offline."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from tiahnm.encoders.build import build_encoder
from tiahnm.errors import ConfigError

REPO = "tiny-org/test-vit-path"
REV = "0123456789abcdef0123456789abcdef01234567"


def _blob(cache_repo, snapshot, path):
    """Move ``path`` into ``blobs/<sha256>`` and link it back, as the hub cache does."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    blob = cache_repo / "blobs" / digest
    blob.parent.mkdir(exist_ok=True)
    path.replace(blob)
    path.symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache holding REPO as timm's push_to_hf_hub writes it (config + weights)."""
    import timm
    from timm.models import save_for_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError(f"tried to download {args} {kwargs}")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)
    monkeypatch.setattr("huggingface_hub.file_download.hf_hub_download", no_download)
    monkeypatch.setattr("timm.models._hub.hf_hub_download", no_download)
    torch.manual_seed(0)
    model = timm.create_model(
        "test_vit", pretrained=False, num_classes=3, img_size=64,
        pretrained_cfg_overlay={"mean": (0.7, 0.6, 0.5), "std": (0.2, 0.25, 0.3)},
    )  # fmt: skip
    cache_repo = tmp_path / f"models--{REPO.replace('/', '--')}"
    snapshot = cache_repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    save_for_hf(model, snapshot, model_args={"img_size": 64}, safe_serialization="both")
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        _blob(cache_repo, snapshot, snapshot / name)
    (cache_repo / "refs").mkdir()
    (cache_repo / "refs" / "main").write_text(REV)
    return model.eval(), snapshot


def test_hub_name_builds_from_the_cache_with_identical_outputs(hub_cache):
    model, _ = hub_cache
    info = build_encoder(f"timm:hf-hub:{REPO}")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
        got = info.module.net(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert info.out_dim == model.num_features
    # the repository's own config.json gives mean/std and the input size
    assert info.preprocessing.mean == (0.7, 0.6, 0.5)
    assert info.preprocessing.std == (0.2, 0.25, 0.3)
    assert info.preprocessing.input_size == 64
    again = build_encoder(f"timm:hf-hub:{REPO}", weights="hf-cache")
    assert again.weights_sha256 == info.weights_sha256 != "random-init"
    pinned = build_encoder(f"timm:hf-hub:{REPO}@{REV}")
    assert pinned.state_sha256 == info.state_sha256


def test_hub_name_missing_from_the_cache_names_the_path(hub_cache):
    with pytest.raises(ConfigError) as err:
        build_encoder("timm:hf-hub:someone/absent-model")
    text = str(err.value)
    assert "models--someone--absent-model/snapshots" in text and "config.json" in text
    assert "huggingface-cli download someone/absent-model" in text
    assert "HF_HUB_OFFLINE=1" in text


def test_hub_snapshot_without_weights_is_an_error(hub_cache):
    _, snapshot = hub_cache
    for name in ("model.safetensors", "pytorch_model.bin"):
        (snapshot / name).unlink()
    with pytest.raises(
        ConfigError, match=r"has no model\.safetensors or pytorch_model\.bin"
    ):
        build_encoder(f"timm:hf-hub:{REPO}")


def test_hub_repository_that_is_not_timm_is_an_error(hub_cache):
    _, snapshot = hub_cache
    config = snapshot / "config.json"
    config.unlink()  # the blob stays; the snapshot entry becomes a plain file
    config.write_text('{"model_type": "dinov2", "hidden_size": 768}')
    with pytest.raises(ConfigError, match=r"config\.json is not a timm model config"):
        build_encoder(f"timm:hf-hub:{REPO}")
