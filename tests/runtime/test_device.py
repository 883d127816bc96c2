"""Device names and autocast dtypes: one resolver for training, extraction, prediction."""

from __future__ import annotations

import pytest
import torch

from tiahnm.errors import ConfigError
from tiahnm.runtime.device import amp_dtype, autocast, resolve_device


def test_auto_and_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("key", ["train.device", "--device"])
def test_a_bad_name_names_the_setting(key: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_device("gpu0", key)
    assert str(err.value) == (
        f"{key}: 'gpu0' is not a device name (auto, cpu, cuda, cuda:0 ...)."
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_names_the_setting() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda:1", "--device")
    assert str(err.value) == (
        "--device is 'cuda:1' but CUDA is not available here; use auto or cpu."
    )


def test_amp_applies_on_cuda_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(cpu, "fp16") is None
    assert amp_dtype(cuda, "off") is None
    assert amp_dtype(cuda, "fp16") is torch.float16
    assert amp_dtype(cuda, "bf16") is torch.bfloat16


def test_autocast_is_a_no_op_without_a_dtype() -> None:
    with autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
