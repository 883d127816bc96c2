"""bf16 autocast on CPU: detection, settings, the auto guard, and where it applies."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tiahnm.config import TrainConfig, from_dict
from tiahnm.data.bag import Bag
from tiahnm.errors import ConfigError
from tiahnm.plugins import get_registry
from tiahnm.training import precision
from tiahnm.training.loop import fit, predict
from tiahnm.training.precision import (
    MIN_COSINE,
    cpu_bf16_support,
    requested_dtype,
    resolve,
    row_cosine,
)

CPU = torch.device("cpu")


def _bags(n: int = 4, size: int = 12, dim: int = 16) -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    return [Bag(f"b{i}", i % 2, torch.randn(size, dim, generator=g)) for i in range(n)]


def _head(name: str = "abmil", dim: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_registry("head").create(name, dim, 2, embed_dim=8)


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
    with caplog.at_level(logging.INFO, logger="tiahnm.training.precision"):
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


# --- where it applies ----------------------------------------------------------------


def _record_dtypes(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_hook(
        lambda _m, _i, out: seen.append((out.dtype, torch.is_autocast_enabled("cpu")))
    )


def test_training_runs_in_bf16(with_bf16: None) -> None:
    head, seen = _head(), []
    _record_dtypes(head.embed[0], seen)
    cfg = TrainConfig(epochs=1, scheduler="none", cpu_precision="bf16", prefetch=0)
    res = fit(head, _bags(), _bags(2), cfg, seed=0)
    assert res.autocast_dtype is torch.bfloat16
    assert seen and all(d == (torch.bfloat16, True) for d in seen)  # train + val
    assert all(v.dtype == torch.float32 for v in res.best_state.values())


def test_mhim_teacher_forward_runs_in_bf16(
    with_bf16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiahnm.miners.mhim import MHIMMiner

    seen = []
    original = MHIMMiner.teacher_scores

    def spy(self, teacher, out):
        seen.append(out.instance_embeddings.dtype)
        return original(self, teacher, out)

    monkeypatch.setattr(MHIMMiner, "teacher_scores", spy)
    miner = get_registry("miner").create("mhim")
    cfg = TrainConfig(epochs=1, scheduler="none", cpu_precision="bf16", prefetch=0)
    fit(_head(), _bags(), [], cfg, miner=miner, seed=0)
    assert seen and set(seen) == {torch.bfloat16}


def test_predict_runs_in_bf16() -> None:
    head, seen = _head(), []
    _record_dtypes(head.embed[0], seen)
    probs, loss, _ = predict(head, _bags(3), CPU, amp=torch.bfloat16)
    assert {d for d, _ in seen} == {torch.bfloat16}
    assert probs.dtype == np.float64 and np.isfinite(loss)
    ref, _, _ = predict(head, _bags(3), CPU)
    assert np.abs(probs - ref).max() < 0.02


def test_auto_guards_on_the_first_training_bag(
    with_bf16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = TrainConfig(epochs=1, scheduler="none", cpu_precision="auto", prefetch=0)
    assert fit(_head(), _bags(), [], cfg, seed=0).autocast_dtype is torch.bfloat16
    monkeypatch.setattr(precision, "MIN_COSINE", 1.5)  # no output can pass
    assert fit(_head(), _bags(), [], cfg, seed=0).autocast_dtype is None


def test_fp32_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 never probes, never autocasts, and trains exactly as with autocast off."""

    def never(*_a: object, **_k: object) -> None:
        pytest.fail("fp32 must neither probe nor check the hardware")

    monkeypatch.setattr(precision, "row_cosine", never)
    monkeypatch.setattr(precision, "cpu_bf16_support", never)
    head, seen = _head(), []
    _record_dtypes(head.embed[0], seen)
    cfg = TrainConfig(epochs=2, scheduler="none", prefetch=0)
    res = fit(head, _bags(), _bags(2), cfg, seed=0)
    assert res.autocast_dtype is None
    assert {s for s in seen} == {(torch.float32, False)}
    # a hand-written loop of the same steps (Adam, one bag per step, seeded order)
    ref = _head()
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bags, g = _bags(), torch.Generator().manual_seed(0)
    for _ in range(2):
        for i in torch.randperm(len(bags), generator=g).tolist():
            opt.zero_grad()
            out = ref(bags[i].features)
            ref.loss(out, torch.tensor([bags[i].label])).backward()
            opt.step()
    last = fit(_head(), _bags(), [], cfg, seed=0).best_state
    for k, v in ref.state_dict().items():
        assert torch.equal(last[k], v), k


# --- the commands ----------------------------------------------------------------------


def test_train_cli_bf16_without_hardware_exits_2(without_bf16: None, tmp_path) -> None:
    from click.testing import CliRunner

    from tests.synthetic import make_bags, write_mil_csv
    from tiahnm.cli import cli

    csv = tmp_path / "bags.csv"
    write_mil_csv(csv, make_bags(8))
    args = ["train", "--mil-csv", str(csv), "--folds", "2", "--epochs", "1"]
    args += ["--output-path", str(tmp_path / "o"), "--set", "train.cpu_precision=bf16"]
    res = CliRunner().invoke(cli, [*args, "--set", "train.device=cpu"])
    assert res.exit_code == 2, res.output
    assert "Error: train.cpu_precision: bf16 needs a CPU with AMX" in res.output


def test_extract_cli_bf16_without_hardware_exits_2(
    without_bf16: None, tmp_path
) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from tiahnm.cli import cli

    img = tmp_path / "s.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    args = ["extract", str(img), "--output-path", str(tmp_path / "f"), "--mpp", "0.5"]
    res = CliRunner().invoke(cli, [*args, "--device", "cpu", "--cpu-precision", "bf16"])
    assert res.exit_code == 2, res.output
    assert "Error: extract.cpu_precision (--cpu-precision): bf16 needs a CPU" in (
        res.output
    )


def test_extractor_bf16_encodes_in_bf16(with_bf16: None, tmp_path) -> None:
    from tiahnm.slides.extract import ExtractConfig, Extractor

    cfgs = {
        p: ExtractConfig(device="cpu", num_workers=0, batch_size=4, cpu_precision=p)
        for p in ("fp32", "bf16", "auto")
    }
    ext = {p: Extractor(c, tmp_path) for p, c in cfgs.items()}
    assert ext["fp32"].settings["precision"] == "fp32" and ext["fp32"].amp_dtype is None
    assert ext["bf16"].settings["precision"] == "bf16"
    assert ext["auto"].amp_dtype is torch.bfloat16  # the probe batch agrees
    seen: list = []
    conv = next(
        m for m in ext["bf16"].module.modules() if isinstance(m, torch.nn.Conv2d)
    )
    _record_dtypes(conv, seen)
    g = torch.Generator().manual_seed(0)
    patches = list(torch.randint(0, 256, (6, 32, 32, 3), generator=g).to(torch.uint8))
    low, _, _ = ext["bf16"].encode(patches)
    ref, _, _ = ext["fp32"].encode(patches)
    assert seen and {d for d, _ in seen} == {torch.bfloat16}
    assert low.dtype == np.float32 and low.shape == ref.shape
    cos = precision.row_cosines(torch.from_numpy(ref), torch.from_numpy(low))
    assert float(cos.min()) > 0.99


def test_run_config_extract_precision_reaches_the_extractor(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import tiahnm.slides.extract as extract_mod
    from tiahnm.pipeline import run_extract_stage

    seen = []

    class Summary:
        failed = ()

    def fake(slides, out, cfg):
        seen.append(cfg.cpu_precision)
        return Summary()

    monkeypatch.setattr(extract_mod, "extract_features", fake)
    config = from_dict(
        {
            "output_dir": str(tmp_path),
            "extract": {"slides": [str(tmp_path)], "cpu_precision": "auto"},
        }
    )
    run_extract_stage(config)
    assert seen == ["auto"]
