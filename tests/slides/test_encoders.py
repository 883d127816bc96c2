from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tiahnm.encoders.base import RANDOM_INIT, Preprocessing
from tiahnm.encoders.build import build_encoder
from tiahnm.errors import ConfigError, DataError
from tiahnm.plugins import get_registry


def test_registered():
    assert {"small_cnn", "torchvision", "timm", "module"} <= set(
        get_registry("encoder")
    )


def test_torchvision_resnet18_local_weights(tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    info = build_encoder("torchvision:resnet18", weights=str(path))
    assert info.out_dim == 512
    assert info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.preprocessing == Preprocessing(
        224, info.preprocessing.mean, info.preprocessing.std
    )
    x = torch.rand(2, 3, 224, 224)
    ref.fc = torch.nn.Identity()
    with torch.inference_mode():
        np.testing.assert_allclose(info.module(x), ref(x), rtol=1e-4, atol=1e-5)
    # a checkpoint without the head loads too
    headless = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")
    build_encoder("torchvision:resnet18", weights=str(tmp_path / "headless.pth"))


def test_weights_missing_is_a_clear_error(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"needs a local weights file.*never downloads.*--weights PATH",
    ):
        build_encoder("torchvision:resnet18")
    with pytest.raises(
        ConfigError, match=r"absent\.pth not found.*get_model\('resnet18'"
    ):
        build_encoder("torchvision:resnet18", weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ConfigError, match=r"timm encoder 'resnet18'.*not found"):
        build_encoder("timm:resnet18", weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet19'.*resnet18"):
        build_encoder("torchvision:resnet19", weights=RANDOM_INIT)


def test_pickled_module_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "full.pt"
    torch.save(torchvision.models.resnet18(weights=None), path)  # a pickled module
    with pytest.raises(DataError, match=r"full\.pt: cannot read weights.*weights_only"):
        build_encoder("torchvision:resnet18", weights=str(path))
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(DataError, match="do not fit"):
        build_encoder("torchvision:resnet18", weights=str(wrong))


def test_timm_local_weights(tmp_path):
    import timm

    ref = timm.create_model("test_resnet", pretrained=False).eval()
    path = tmp_path / "test_resnet.pth"
    torch.save(ref.state_dict(), path)  # includes the classifier: ignored
    info = build_encoder(
        "timm:test_resnet",
        weights=str(path),
        options={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    )
    assert info.preprocessing.mean == (0.5, 0.5, 0.5)
    x = torch.rand(1, 3, 64, 64)
    ref.reset_classifier(0)
    with torch.inference_mode():
        np.testing.assert_allclose(info.module(x), ref(x), rtol=1e-4, atol=1e-5)
    assert info.out_dim == ref.num_features


def test_module_encoder(tmp_path):
    info = build_encoder(
        "module:tests.slides.helpers:TinyNet", options={"kwargs": {"width": 5}}
    )
    assert info.out_dim == 5 and info.weights_sha256 == RANDOM_INIT
    path = tmp_path / "tiny.pth"
    torch.save(info.module.net.state_dict(), path)
    again = build_encoder(
        "module:tests.slides.helpers:TinyNet",
        weights=str(path),
        options={"kwargs": {"width": 5}},
    )
    assert again.state_sha256 == info.state_sha256
    with pytest.raises(ConfigError, match="cannot import"):
        build_encoder("module:no_such_pkg.x:Y")


def test_small_cnn_is_seeded_and_declares_preprocessing():
    a, b = build_encoder("small_cnn", seed=3), build_encoder("small_cnn", seed=3)
    assert a.state_sha256 == b.state_sha256 != build_encoder("small_cnn").state_sha256
    assert a.out_dim == 128 and a.preprocessing.mean == (0.5, 0.5, 0.5)
    x = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    y = a.preprocessing(x)
    assert y.shape == (2, 3, 40, 40) and float(y.min()) >= -1 and float(y.max()) <= 1


def test_cli_weights_missing_exit_2(slide_dir, tmp_path):
    from tiahnm.cli import cli

    res = CliRunner().invoke(
        cli,
        [
            "extract",
            str(slide_dir / "syn_a.tif"),
            "--output-path",
            str(tmp_path / "out"),
            "--encoder",
            "torchvision:resnet18",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "needs a local weights file" in res.output


def test_small_cnn_loads_a_state_dict(tmp_path):
    from tiahnm.encoders.small_cnn import SmallCNN

    torch.manual_seed(7)
    path = tmp_path / "cnn.pth"
    torch.save(SmallCNN(out_dim=8).state_dict(), path)
    info = build_encoder("small_cnn", weights=str(path), options={"out_dim": 8})
    assert info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="do not fit"):
        build_encoder("small_cnn", weights=str(path))  # out_dim 128 != 8
