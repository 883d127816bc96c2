"""Model selection over rounds, learning-rate warm-up, evaluation.instance_score."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.config import TrainConfig, from_dict
from tiahnm.crossval import build_head, run_training
from tiahnm.errors import ConfigError
from tiahnm.heads.abmil import ABMIL
from tiahnm.heads.end_to_end import EncoderMIL
from tiahnm.heads.pooling import MeanPoolingMIL
from tiahnm.miners.base import Miner
from tiahnm.training.loop import fit, make_scheduler


class FlipMiner(Miner):
    """Adds every training bag again with the wrong label: later rounds get worse."""

    def on_round_end(self, ctx, train_bags):
        return [
            dataclasses.replace(b, slide_id=f"{b.slide_id}_flip", label=1 - b.label)
            for b in train_bags
            for _ in range(3)
        ]


class CopyMiner(Miner):
    """Adds copies of the real bags: later rounds may get better or worse."""

    def on_round_end(self, ctx, train_bags):
        real = [b for b in train_bags if b.origin == "real"]
        return [dataclasses.replace(b, slide_id=f"{b.slide_id}_c") for b in real]


def head():
    torch.manual_seed(0)
    return ABMIL(8, 2, embed_dim=16, attn_dim=8, dropout=0.0)


def cfg(**kw):
    base = {"epochs": 4, "lr": 5e-3, "patience": 100, "progress": False}
    base.update(kw)
    return TrainConfig(**base)


def best_by_round(history):
    """(round, epoch) of the lowest validation loss; earlier wins ties."""
    row = min(history, key=lambda r: (r["val_loss"], r["round"], r["epoch"]))
    return row["round"], row["epoch"]


def test_a_worse_later_round_is_not_kept():
    bags = make_bags(24)
    train, val = bags[:16], bags[16:]
    one = fit(head(), train, val, cfg(rounds=1), seed=1)
    two = fit(head(), train, val, cfg(rounds=2), miner=FlipMiner(), seed=1)
    rounds = [r["round"] for r in two.history]
    assert rounds == [0] * 4 + [1] * 4  # the history shows each round
    r0 = min(r["val_loss"] for r in two.history if r["round"] == 0)
    r1 = min(r["val_loss"] for r in two.history if r["round"] == 1)
    assert r1 > r0  # the flipped labels made round 1 worse on validation
    assert two.best_round == 0 and two.best_epoch == one.best_epoch
    for k, v in one.best_state.items():
        assert torch.equal(two.best_state[k], v), k


def test_the_best_round_on_validation_is_kept():
    bags = make_bags(24, seed=3)
    res = fit(head(), bags[:16], bags[16:], cfg(rounds=3), miner=CopyMiner(), seed=2)
    assert (res.best_round, res.best_epoch) == best_by_round(res.history)
    # without validation bags the last round is kept
    res = fit(head(), bags[:16], [], cfg(rounds=2), miner=CopyMiner(), seed=2)
    assert (res.best_round, res.best_epoch) == (1, 3)


def test_round_selection_survives_resume(tmp_path):
    bags = make_bags(24)
    full = fit(head(), bags[:16], bags[16:], cfg(rounds=2), miner=FlipMiner(), seed=1)

    class Stop(Exception):
        pass

    def stop(row):
        if row["round"] == 1 and row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(
            head(),
            bags[:16],
            bags[16:],
            cfg(rounds=2),
            miner=FlipMiner(),
            seed=1,
            checkpoint_dir=tmp_path,
            on_epoch_end=stop,
        )
    torch.manual_seed(5)
    again = fit(
        ABMIL(8, 2, embed_dim=16, attn_dim=8, dropout=0.0),
        bags[:16],
        bags[16:],
        cfg(rounds=2),
        miner=FlipMiner(),
        seed=1,
        checkpoint_dir=tmp_path,
    )
    assert (again.best_round, again.best_epoch) == (full.best_round, full.best_epoch)
    for k, v in full.best_state.items():
        assert torch.equal(again.best_state[k], v), k


def lrs(train_cfg, n):
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    sched = make_scheduler(opt, train_cfg)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_learning_rate_warmup():
    # linear from lr / 10 over 2 epochs, then cosine over the remaining 4
    got = lrs(cfg(epochs=6, warmup_epochs=2), 6)
    cos = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert got == pytest.approx([0.1, 0.55, *cos])
    assert lrs(cfg(epochs=4, warmup_epochs=2, scheduler="none"), 4) == pytest.approx(
        [0.1, 0.55, 1.0, 1.0]
    )
    assert lrs(cfg(epochs=3), 3) == pytest.approx([1.0, 0.75, 0.25])
    for key, value in (("warmup_epochs", -1), ("grad_clip", 0.0)):
        with pytest.raises(ConfigError, match=f"train.{key} must be"):
            from_dict({"train": {key: value}})


def test_instance_score_is_checked_and_used(tmp_path):
    def config(name, score, **options):
        return from_dict(
            {
                "output_dir": str(tmp_path / name),
                "data": {"source": "mil_csv", "options": {"path": str(csv)}},
                "head": {"name": name, "options": options},
                "train": {"epochs": 1, "progress": False},
                "cv": {"folds": 2},
                "evaluation": {"instance_score": score, "bootstrap": 0},
            }
        )

    csv = tmp_path / "bags.csv"
    write_mil_csv(csv, make_bags(12))
    h = build_head(config("abmil", "attention", embed_dim=16), 8, 2)
    assert h.default_eval_score == "attention"
    out = h.eval()(torch.randn(5, 8))
    assert torch.equal(h.instance_scores(out), out.attention.float().mean(0))
    with pytest.raises(ConfigError, match=r"evaluation.instance_score: MeanPooling"):
        run_training(config("mean_pool", "attention"))
    with pytest.raises(ConfigError, match=r"choose one of .*instance_prob"):
        build_head(config("abmil", "bogus"), 8, 2)
    wrapped = EncoderMIL(
        64, 2, encoder_options={"out_dim": 8, "width": 4}, head_options={"embed_dim": 8}
    )
    wrapped.set_eval_score("class_aware")
    assert wrapped.head.default_eval_score == "class_aware"
    assert MeanPoolingMIL(8, 2).default_eval_score == "instance_prob"  # class default
    summary = run_training(config("abmil", "attention", embed_dim=16))
    import h5py

    scores = tmp_path / "abmil" / "folds" / "r0_f0" / "instance_scores.h5"
    with h5py.File(scores) as f:
        assert f.attrs["score_kind"] == "attention"
    from tiahnm.evaluation.predict import load_heads

    best = tmp_path / "abmil" / "folds" / "r0_f0" / "best.pt"
    (loaded,) = load_heads(best, torch.device("cpu"))
    assert loaded.head.default_eval_score == "attention"  # predict scores the same
    assert [f["best_round"] for f in summary["folds"]] == [0, 0]


def test_extract_annotations_without_slides_is_an_error():
    with pytest.raises(ConfigError, match=r"data.options.instance_labels"):
        from_dict({"extract": {"annotations": "masks/"}})
