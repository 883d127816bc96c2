"""bf16 autocast on CPU: detection, the settings and the auto guard."""

from __future__ import annotations

import logging

import pytest
import torch

from tiahnm.config import from_dict
from tiahnm.errors import ConfigError
from tiahnm.runtime import precision
from tiahnm.runtime.precision import (
    MIN_COSINE,
    cpu_bf16_support,
    requested_dtype,
    resolve,
    row_cosine,
)

CPU = torch.device("cpu")


@pytest.fixture
def with_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the CPU has AMX (bf16 autocast itself runs on any CPU)."""
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "amx_bf16")


@pytest.fixture
def without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the CPU has no bf16 units."""
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)


# --- detection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "onednn", "expected"),
    [
        ({"amx_bf16": True, "avx512_bf16": True}, True, "amx_bf16"),
        ({"amx_bf16": False, "avx512_bf16": True}, True, "avx512_bf16"),
        ({"amx_bf16": False, "avx512_bf16": False, "avx512_f": True}, True, None),
        ({"amx_bf16": True}, False, None),  # oneDNN must agree
    ],
)
def test_detection_reads_cpu_flags(
    monkeypatch: pytest.MonkeyPatch, caps: dict, onednn: bool, expected: str | None
) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.setattr(
        torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn, raising=False
    )
    assert cpu_bf16_support() == expected


def test_detection_matches_this_cpu() -> None:
    caps = torch.cpu.get_capabilities()
    found = cpu_bf16_support()
    if found is None:
        assert not (caps.get("amx_bf16") and caps.get("avx512_bf16"))
    else:
        assert caps[found] is True


# --- selection ---------------------------------------------------------------------


def test_fp32_and_cuda_never_autocast(with_bf16: None) -> None:
    assert requested_dtype("fp32", CPU, "k") is None
    assert requested_dtype("bf16", torch.device("cuda"), "k") is None
    assert requested_dtype("bf16", CPU, "k") is torch.bfloat16
    assert requested_dtype("auto", CPU, "k") is torch.bfloat16


def test_bf16_without_hardware_is_a_config_error(without_bf16: None) -> None:
    with pytest.raises(ConfigError, match=r"train\.cpu_precision: bf16 needs a CPU"):
        requested_dtype("bf16", CPU, "train.cpu_precision")


def test_auto_without_hardware_falls_back_logged(
    without_bf16: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tiahnm.runtime.precision"):
        assert requested_dtype("auto", CPU, "train.cpu_precision") is None
    assert "auto: fp32 (no AMX / AVX-512 bf16" in caplog.text


def test_unknown_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"extract\.cpu_precision: 'fp16'"):
        requested_dtype("fp16", CPU, "extract.cpu_precision")


def test_config_validates_cpu_precision() -> None:
    assert from_dict({}).train.cpu_precision == "fp32"
    assert from_dict({}).extract.cpu_precision == "fp32"
    cfg = from_dict({"train": {"cpu_precision": "auto"}, "extract": {}})
    assert cfg.train.cpu_precision == "auto"
    with pytest.raises(ConfigError, match=r"train\.cpu_precision: 'fp16'"):
        from_dict({"train": {"cpu_precision": "fp16"}})
    with pytest.raises(ConfigError, match=r"extract\.cpu_precision"):
        from_dict({"extract": {"cpu_precision": "half"}})


def test_extract_config_validates_cpu_precision() -> None:
    from tiahnm.slides.extract import ExtractConfig

    with pytest.raises(ConfigError, match=r"--cpu-precision"):
        ExtractConfig(cpu_precision="bfloat16")


# --- the auto guard ----------------------------------------------------------------


def test_row_cosine_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert row_cosine(a, b) == pytest.approx(0.5)  # rows: 0 and 1
    assert row_cosine((a, a[:1]), (b, a[:1])) == pytest.approx(2 / 3)
    zero = torch.zeros(1, 2)
    assert row_cosine(zero, zero) == 1.0  # silenced in both: agreement
    assert row_cosine(zero, a[:1]) == 0.0


def test_guard_keeps_bf16_only_when_outputs_agree(with_bf16: None) -> None:
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))

    def good(dtype: torch.dtype | None) -> torch.Tensor:
        return x if dtype is None else x.bfloat16().float()

    def bad(dtype: torch.dtype | None) -> torch.Tensor:
        return x if dtype is None else x + 0.2 * torch.randn_like(x)

    kept = resolve("auto", CPU, "k", good)
    assert kept.dtype is torch.bfloat16 and kept.cosine >= MIN_COSINE
    dropped = resolve("auto", CPU, "k", bad)
    assert dropped.dtype is None and dropped.name == "fp32"
    assert dropped.cosine < MIN_COSINE
    # explicit bf16 is not second-guessed, fp32 never probes
    assert resolve("bf16", CPU, "k", bad).dtype is torch.bfloat16
    assert resolve("fp32", CPU, "k", lambda _: pytest.fail("probed")).cosine is None


def test_guard_leaves_the_rng_alone(with_bf16: None) -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    resolve("auto", CPU, "k", lambda _: torch.rand(4, 4))
    assert torch.equal(torch.rand(3), expected)
