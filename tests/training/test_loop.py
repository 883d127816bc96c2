import math

import pytest
import torch

from tests.synthetic import make_bags
from tiahnm.config import TrainConfig
from tiahnm.heads.abmil import ABMIL
from tiahnm.miners.base import Miner
from tiahnm.training.loop import fit, predict
from tiahnm.training.metrics import binary_metrics


def cfg(**kw):
    base = {
        "epochs": 6,
        "lr": 5e-3,
        "weight_decay": 0.0,
        "patience": 100,
        "progress": False,
    }
    base.update(kw)
    return TrainConfig(**base)


def new_head(seed=0):
    torch.manual_seed(seed)
    return ABMIL(8, 2, embed_dim=16, attn_dim=8, dropout=0.25)


def test_learns_synthetic_witnesses():
    bags = make_bags(40)
    train, val, test = bags[:24], bags[24:30], bags[30:]
    head = new_head()
    res = fit(head, train, val, cfg(epochs=15), seed=0)
    head.load_state_dict(res.best_state)
    probs, _, _ = predict(head, test, torch.device("cpu"))
    assert binary_metrics([b.label for b in test], probs[:, 1])["auc"] >= 0.9


def test_deterministic_under_seed():
    bags = make_bags(16)
    a = fit(new_head(), bags[:12], bags[12:], cfg(), seed=3)
    b = fit(new_head(), bags[:12], bags[12:], cfg(), seed=3)
    assert a.history == b.history
    for k in a.best_state:
        assert torch.equal(a.best_state[k], b.best_state[k])
    c = fit(new_head(), bags[:12], bags[12:], cfg(), seed=4)
    assert c.history != a.history


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    bags = make_bags(16)
    full = fit(
        new_head(),
        bags[:12],
        bags[12:],
        cfg(epochs=8),
        seed=1,
        checkpoint_dir=tmp_path / "full",
    )

    class Interrupt(Exception):
        pass

    def stop_at_5(row):
        if row["epoch"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(
            new_head(),
            bags[:12],
            bags[12:],
            cfg(epochs=8),
            seed=1,
            checkpoint_dir=tmp_path / "cut",
            on_epoch_end=stop_at_5,
        )
    assert (tmp_path / "cut" / "last.pt").is_file()
    seen = []
    # A different init proves the state comes from the checkpoint, not from the seed.
    resumed = fit(
        new_head(seed=99),
        bags[:12],
        bags[12:],
        cfg(epochs=8),
        seed=1,
        checkpoint_dir=tmp_path / "cut",
        on_epoch_end=lambda r: seen.append(r["epoch"]),
    )
    assert seen == [
        5,
        6,
        7,
    ]  # epoch 5 was lost with the kill and is redone, nothing else
    assert resumed.history == full.history
    assert resumed.best_epoch == full.best_epoch
    for k in full.best_state:
        assert torch.equal(resumed.best_state[k], full.best_state[k])


def _stop_epoch(val_losses, patience, min_epochs):
    """The early-stopping rule by hand: the epoch after which training stops."""
    best, bad = float("inf"), 0
    for epoch, loss in enumerate(val_losses):
        best, bad = (loss, 0) if loss < best else (best, bad + 1)
        if bad >= patience and epoch + 1 >= min_epochs:
            return epoch
    return None


def test_early_stopping_uses_patience_and_min_epochs():
    bags = make_bags(12)
    res = fit(
        new_head(),
        bags[:8],
        bags[8:],
        cfg(epochs=30, lr=0.0, patience=3, min_epochs=0),
        seed=0,
    )
    assert len(res.history) == 4  # lr 0: no improvement after epoch 0
    res = fit(
        new_head(),
        bags[:8],
        bags[8:],
        cfg(epochs=30, lr=0.0, patience=3, min_epochs=10),
        seed=0,
    )
    assert len(res.history) == 10
    assert res.best_epoch == 0
    # lr 0.02: validation improves up to epoch 5, stalls for 2 epochs, improves at 8
    # (the count restarts), then stalls for 3: training stops after epoch 11
    res = fit(
        new_head(),
        bags[:8],
        bags[8:],
        cfg(epochs=30, lr=0.02, patience=3, min_epochs=0),
        seed=0,
    )
    losses = [r["val_loss"] for r in res.history]
    assert _stop_epoch(losses, 3, 0) == len(losses) - 1 == 11
    assert res.best_epoch == losses.index(min(losses)) == 8
    assert _stop_epoch(losses[:8], 3, 0) is None  # 2 stalled epochs before epoch 8


def test_no_validation_keeps_last_epoch():
    bags = make_bags(8)
    res = fit(new_head(), bags, [], cfg(epochs=3), seed=0)
    assert res.best_epoch == 2
    assert "val_loss" not in res.history[0]


class CountingMiner(Miner):
    def __init__(self):
        self.seen = set()
        self.steps = 0

    def batches(self, ctx, bags, generator):
        for batch in super().batches(ctx, bags, generator):
            self.seen.update(b.slide_id for b in batch)
            yield batch

    def forward(self, ctx, features, label, step):
        self.steps += 1
        return super().forward(ctx, features, label, step)


def test_miner_sees_only_training_bags_and_val_selects():
    bags = make_bags(12)
    miner = CountingMiner()
    res = fit(new_head(), bags[:8], bags[8:], cfg(epochs=2), miner=miner, seed=0)
    assert miner.steps == 16
    assert miner.seen == {b.slide_id for b in bags[:8]}
    assert res.best_epoch in (0, 1)
    assert all(not math.isnan(r["val_loss"]) for r in res.history)
    # the best epoch is the one with the lowest validation loss
    losses = [r["val_loss"] for r in res.history]
    assert res.best_epoch == losses.index(min(losses))


def test_extra_losses_are_added():
    from tiahnm.losses.ranking import MIRankLoss

    class PairMiner(Miner):
        def batches(self, ctx, bags, generator):
            pos = [b for b in bags if b.label == 1]
            neg = [b for b in bags if b.label == 0]
            for p, n in zip(pos, neg, strict=False):
                yield [p, n]

        def n_steps(self, bags):
            return len(bags) // 2

    class RecordingRank(MIRankLoss):
        def __init__(self):
            super().__init__(k=2)
            self.values = []

        def __call__(self, head, outputs, labels):
            assert sorted(labels) == [0, 1]
            value = super().__call__(head, outputs, labels)
            self.values.append(float(value))
            return value

    bags = make_bags(12)

    def run(weight):
        rank = RecordingRank()
        res = fit(
            new_head(),
            bags[:8],
            bags[8:],
            cfg(epochs=2, lr=0.0),  # lr 0: both runs see the same outputs
            miner=PairMiner(),
            losses=[(rank, weight)],
            seed=0,
        )
        return res, rank.values

    with_rank, values = run(0.5)
    without, _ = run(0.0)
    assert len(with_rank.history) == 2
    assert len(values) == 8 and max(values) > 0  # 4 pairs per epoch
    for epoch in range(2):
        added = 0.5 * sum(values[4 * epoch : 4 * epoch + 4]) / 4
        got = (
            with_rank.history[epoch]["train_loss"]
            - without.history[epoch]["train_loss"]
        )
        assert got == pytest.approx(added, rel=1e-5, abs=1e-6)
