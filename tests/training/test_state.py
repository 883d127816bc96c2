"""The loop's explicit training state, its step counter, and miners' inner training."""

from __future__ import annotations

import math

import pytest
import torch

from tests.synthetic import make_bags
from tiahnm.config import TrainConfig
from tiahnm.data.bag import Bag
from tiahnm.errors import ConfigError
from tiahnm.heads.abmil import ABMIL
from tiahnm.miners.base import FitContext, Miner, SubTraining
from tiahnm.miners.li2019 import Li2019Miner
from tiahnm.runtime.checkpoint import load_checkpoint
from tiahnm.training.loop import fit, sub_training
from tiahnm.training.state import OverallBest, RoundBest, TrainingState

CPU = torch.device("cpu")


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 4, "lr": 5e-3, "weight_decay": 0.0, "patience": 100}
    base.update(progress=False, **kw)
    return TrainConfig(**base)


def head(seed: int = 0) -> ABMIL:
    torch.manual_seed(seed)
    return ABMIL(8, 2, embed_dim=16, attn_dim=8, dropout=0.25)


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    generated = Bag("gen_r0_000", 0, torch.randn(3, 8), origin="generated")
    state = TrainingState(
        round=1,
        epoch=3,
        step=17,
        stopped=True,
        history=[{"round": 0, "epoch": 0, "train_loss": 0.5}],
        best=RoundBest((0.9, -0.1), 2, {"w": torch.ones(2)}, 1),
        overall=OverallBest((0.8, 0.0), 5, {"w": torch.zeros(2)}, 0),
        added_bags=[generated],
    )
    path = tmp_path / "s.pt"
    torch.save(state.to_dict(), path)
    back = TrainingState.from_dict(torch.load(path, weights_only=True))
    assert (back.round, back.epoch, back.step, back.stopped) == (1, 3, 17, True)
    assert back.history == state.history
    assert back.best.score == (0.9, -0.1) and back.best.epoch == 2
    assert back.best.bad_epochs == 1 and torch.equal(
        back.best.state["w"], torch.ones(2)
    )
    assert back.overall.score == (0.8, 0.0) and back.overall.round == 0
    (bag,) = back.added_bags
    assert bag.slide_id == "gen_r0_000" and bag.origin == "generated"
    assert torch.equal(bag.features, generated.features)
    # the saved "epoch" is the last finished one, as checkpoints always held it
    assert state.to_dict()["epoch"] == 2


def test_keep_better_prefers_earlier_round_on_ties_and_latest_without_validation():
    overall = OverallBest()
    overall.keep_better(RoundBest((0.5, 0.0), 3, {}, 0), 0, has_val=True)
    overall.keep_better(RoundBest((0.5, 0.0), 1, {}, 0), 1, has_val=True)
    assert (overall.round, overall.epoch) == (0, 3)
    overall.keep_better(RoundBest((0.7, 0.0), 2, {}, 0), 2, has_val=True)
    assert (overall.round, overall.epoch) == (2, 2)
    overall.keep_better(RoundBest((0.1, 0.0), 0, {}, 0), 3, has_val=False)
    assert overall.round == 3


class StepRecorder(Miner):
    """Plain training that records the step every hook receives."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []  # (round, step)

    def after_step(self, ctx: FitContext, step: int) -> None:
        self.steps.append((ctx.round, step))


def test_step_counter_is_checkpointed_and_continues_after_resume(tmp_path):
    bags = make_bags(10, dim=8, seed=0)
    train, val = bags[:8], bags[8:]
    full_miner = StepRecorder()
    fit(head(), train, val, cfg(rounds=2), miner=full_miner, seed=1)
    # 8 bags, one per step: 8 optimiser steps per epoch, 4 epochs, counted per round
    assert full_miner.steps == [(r, s) for r in range(2) for s in range(32)]

    cut = tmp_path / "cut"
    fit(
        head(),
        train,
        val,
        cfg(epochs=2, rounds=1),
        miner=StepRecorder(),
        seed=1,
        checkpoint_dir=cut,
    )
    saved = load_checkpoint(cut / "last.pt")
    assert saved["step"] == 16 and saved["epoch"] == 1
    # a run with 4 epochs resumes at epoch 2, step 16 (no restart at 0)
    resumed = StepRecorder()
    fit(head(), train, val, cfg(rounds=2), miner=resumed, seed=1, checkpoint_dir=cut)
    assert resumed.steps == full_miner.steps[16:]


def test_checkpoint_without_step_counter_resumes_from_the_epoch(tmp_path):
    bags = make_bags(10, dim=8, seed=0)
    cut = tmp_path / "old"
    fit(head(), bags[:8], bags[8:], cfg(epochs=2), seed=1, checkpoint_dir=cut)
    saved = load_checkpoint(cut / "last.pt")
    del saved["step"]  # as written before the step counter existed
    torch.save(saved, cut / "last.pt")
    miner = StepRecorder()
    fit(head(), bags[:8], bags[8:], cfg(), miner=miner, seed=1, checkpoint_dir=cut)
    assert miner.steps[0] == (0, 2 * 8)  # epoch 2 x 8 steps per epoch


def test_batches_that_disagree_with_n_steps_are_an_error_naming_the_miner():
    class Liar(Miner):
        name = "liar"

        def n_steps(self, bags):
            return len(bags) + 1

    bags = make_bags(6, dim=8, seed=0)
    with pytest.raises(ConfigError, match=r"miner 'liar': batches\(\) yielded 6"):
        fit(head(), bags, [], cfg(epochs=1), miner=Liar())


def test_a_hand_built_context_refuses_inner_training_by_name():
    ctx = FitContext(head=head(), device=CPU, epochs=1, steps_per_epoch=1)
    assert type(ctx.sub) is SubTraining
    with pytest.raises(NotImplementedError, match=r"SubTraining\.fit: .*sub_training"):
        ctx.sub.fit(head(), [], key="k", seed=0, epochs=1, lr=1e-3)


def test_inner_fit_takes_the_run_runtime_and_checkpoints_below_it(
    tmp_path, monkeypatch
):
    from tiahnm.runtime import precision

    # bf16 autocast runs on any CPU; the guard wants AMX / AVX-512 bf16 units
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "amx_bf16")
    """Li 2019's out-of-fold models train through ctx.sub: the outer run's CPU
    precision reaches them, and each leaves a resumable checkpoint per round."""
    import tiahnm.training.loop as loop

    seen: list[TrainConfig] = []
    real_fit = loop.fit

    def spy(h, train, val, c, **kw):
        if kw.get("checkpoint_dir") and "sub" in str(kw["checkpoint_dir"]):
            seen.append(c)
        return real_fit(h, train, val, c, **kw)

    monkeypatch.setattr(loop, "fit", spy)
    bags = make_bags(16, dim=8, seed=3)
    miner = Li2019Miner(
        fp_source="out_of_fold", mode="sb", fp_threshold=0.0, oof_epochs=2, oof_folds=2
    )
    out = tmp_path / "fold"
    outer = cfg(epochs=2, rounds=2, cpu_precision="bf16", nonfinite="skip")
    res = loop.fit(
        head(), bags[:12], bags[12:], outer, miner=miner, seed=0, checkpoint_dir=out
    )
    assert len(seen) == 2
    assert all(c.cpu_precision == "bf16" and c.nonfinite == "skip" for c in seen)
    assert all(c.epochs == 2 and c.rounds == 1 for c in seen)
    inner = sorted(p.parent.name for p in (out / "sub").glob("*/last.pt"))
    assert inner == ["r0_oof0", "r0_oof1"]
    assert all(math.isfinite(r["train_loss"]) for r in res.history)


def test_inner_step_is_one_optimiser_step_under_the_run_autocast():
    import copy

    sub = sub_training(CPU, dtype=torch.bfloat16)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)
    ref = copy.deepcopy(lin)
    x = torch.randn(3, 4)
    with sub.autocast():
        out = lin(x)
    assert out.dtype is torch.bfloat16
    loss = out.float().pow(2).mean()
    # the same step by hand: bf16 autocast forward, backward, w - lr * grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = ref(x).float().pow(2).mean()
    ref_loss.backward()
    want = ref.weight.detach() - 0.1 * ref.weight.grad
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    value = sub.step(opt, list(lin.parameters()), loss)
    assert value == float(ref_loss)
    torch.testing.assert_close(lin.weight.detach(), want, rtol=0, atol=0)
