"""bf16 autocast on CPU where it applies: training, mining, predicting, extracting.

Detection, the settings and the guard itself: ``tests/runtime/test_precision.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiahnm.config import TrainConfig, from_dict
from tiahnm.data.bag import Bag
from tiahnm.plugins import get_registry
from tiahnm.runtime import precision
from tiahnm.training.loop import fit, predict

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
