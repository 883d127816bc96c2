"""Contract tests run on every registered miner (built-in or plugin).

Every miner found in the ``miner`` registry must, inside the shared loop
(:func:`tiahnm.training.loop.fit`): build with its defaults and reject unknown options
by name; train to finite losses with one history row per epoch and round; take exactly
``ctx.steps_per_epoch`` optimiser steps per epoch (the number it announced through
``n_steps``); see only training bags (and bags it generated itself); be deterministic
under a seed; round-trip its ``state_dict`` through ``torch.load(weights_only=True)``;
and resume from an interrupted checkpoint to the same history as an uninterrupted run.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from tests.synthetic import make_bags
from tiahnm.config import TrainConfig
from tiahnm.data.bag import Bag
from tiahnm.errors import ConfigError
from tiahnm.heads.abmil import ABMIL
from tiahnm.heads.base import MILHead
from tiahnm.heads.end_to_end import EncoderMIL
from tiahnm.miners.base import Miner
from tiahnm.plugins import get_registry
from tiahnm.training.loop import fit
from tiahnm.utils.options import defaults, parse

MINER_NAMES = sorted(get_registry("miner"))
SIDE = 8


def feature_bags() -> list[Bag]:
    return make_bags(16, dim=8, seed=0, min_n=6, max_n=10)


def image_bags() -> list[Bag]:
    """1 x 8 x 8 images (flattened rows); positive bags hold a bright square."""
    rng = np.random.default_rng(0)
    bags = []
    for i in range(12):
        label = i % 2
        x = rng.uniform(0, 0.3, size=(6, 1, SIDE, SIDE)).astype(np.float32)
        if label:
            x[:1, :, 2:6, 2:6] = 1.0
        bags.append(Bag(f"img{i:02d}", label, torch.from_numpy(x.reshape(6, -1))))
    return bags


def abmil() -> MILHead:
    return ABMIL(8, 2, embed_dim=16, attn_dim=8, dropout=0.0)


def encoder_mil() -> MILHead:
    return EncoderMIL(
        SIDE * SIDE,
        2,
        encoder_options={"out_dim": 8, "width": 4},
        head="dsmil",
        head_options={"embed_dim": 8, "query_dim": 4, "dropout": 0.0},
    )


@dataclass
class Setup:
    """What a miner needs to run in the loop: a head, bags, options, rounds."""

    head: Callable[[], MILHead] = abmil
    bags: Callable[[], list[Bag]] = feature_bags
    options: dict = field(default_factory=dict)
    rounds: int = 1


# Miners that need a particular head or options to do their work; any other
# (third-party) miner runs with the default setup.
SETUPS: dict[str, Setup] = {
    "mhim": Setup(options={"mask_ratio_h": 0.2, "mask_ratio_r": 0.3}),
    "li2019": Setup(options={"mode": "sb", "fp_threshold": 0.0}, rounds=2),
    "hnm": Setup(
        head=encoder_mil,
        bags=image_bags,
        options={"batch_size": 20, "finetune_epochs": 1, "warmup": 5, "proj_dim": 4},
        rounds=2,
    ),
}


def setup_for(name: str) -> Setup:
    return SETUPS.get(name, Setup())


def make_miner(name: str) -> Miner:
    return get_registry("miner").create(
        name, key="miner.options", **setup_for(name).options
    )


def cfg(rounds: int, epochs: int = 3) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        rounds=rounds,
        lr=5e-3,
        weight_decay=0.0,
        patience=100,
        progress=False,
    )


def run(name: str, *, seed: int = 0, miner: Miner | None = None, **kw):
    setup = setup_for(name)
    bags = setup.bags()
    torch.manual_seed(0)
    head = setup.head()
    miner = miner or make_miner(name)
    result = fit(
        head, bags[:-4], bags[-4:], cfg(setup.rounds), miner=miner, seed=seed, **kw
    )
    return result, miner, bags


def untimed(history: list[dict]) -> list[dict]:
    """History rows without wall-clock figures (``*_seconds*``), which never repeat."""
    return [{k: v for k, v in row.items() if "_seconds" not in k} for row in history]


def assert_same_state(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_builtin_miners_registered():
    assert {"none", "mhim", "li2019", "hnm"} <= set(MINER_NAMES)


@pytest.mark.parametrize("name", MINER_NAMES)
def test_builds_with_defaults_and_rejects_unknown_options(name):
    assert isinstance(get_registry("miner").create(name), Miner)
    with pytest.raises(ConfigError, match=r"miner\.options\.no_such_option"):
        get_registry("miner").create(name, key="miner.options", no_such_option=1)


#: Miners with a declared options class (the others are checked by signature).
DECLARED = [n for n in MINER_NAMES if get_registry("miner")[n].options is not None]


def test_builtin_mining_miners_declare_options():
    assert {"mhim", "li2019", "hnm"} <= set(DECLARED)


@pytest.mark.parametrize("name", DECLARED)
def test_declared_options_defaults_parse_and_build(name):
    """A miner with an options class: its defaults parse and give the same miner."""
    entry = get_registry("miner")[name]
    given = defaults(entry.options)
    assert parse(entry.options, given, key="miner.options") == entry.options()
    explicit = get_registry("miner").create(name, **given)
    implicit = get_registry("miner").create(name)
    assert {k: getattr(explicit, k) for k in given} == {
        k: getattr(implicit, k) for k in given
    }


@pytest.mark.parametrize("name", MINER_NAMES)
def test_trains_with_announced_steps_on_training_bags_only(name):
    miner = make_miner(name)
    seen: set[str] = set()
    steps: list[tuple[int, int]] = []  # (steps taken in an epoch, announced)
    epoch_steps = [0]
    original_batches = miner.batches
    original_after_step = miner.after_step
    original_epoch_start = miner.on_epoch_start

    def batches(ctx, bags, generator):
        for batch in original_batches(ctx, bags, generator):
            seen.update(b.slide_id for b in batch if b.origin != "generated")
            yield batch

    def on_epoch_start(ctx, epoch):
        if epoch > 0 or ctx.round > 0:
            steps.append((epoch_steps[0], announced[0]))
        epoch_steps[0] = 0
        announced[0] = ctx.steps_per_epoch
        original_epoch_start(ctx, epoch)

    def after_step(ctx, step):
        epoch_steps[0] += 1
        original_after_step(ctx, step)

    announced = [0]
    miner.batches = batches
    miner.after_step = after_step
    miner.on_epoch_start = on_epoch_start
    result, _, bags = run(name, miner=miner)
    steps.append((epoch_steps[0], announced[0]))

    setup = setup_for(name)
    assert len(result.history) == setup.rounds * 3
    assert [row["round"] for row in result.history] == [
        r for r in range(setup.rounds) for _ in range(3)
    ]
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert all(np.isfinite(row["val_loss"]) for row in result.history)
    for taken, promised in steps:
        assert taken == promised > 0
    train_ids = {b.slide_id for b in bags[:-4]}
    val_ids = {b.slide_id for b in bags[-4:]}
    assert seen, "the miner yielded no training bag"
    assert seen <= train_ids
    assert not seen & val_ids


@pytest.mark.parametrize("name", MINER_NAMES)
def test_deterministic_under_seed(name):
    a, _, _ = run(name, seed=5)
    b, _, _ = run(name, seed=5)
    assert untimed(a.history) == untimed(b.history)
    assert_same_state(a.best_state, b.best_state)
    # the seed is used: another one shuffles (and masks, mines) otherwise
    c, _, _ = run(name, seed=6)
    assert untimed(c.history) != untimed(a.history)


@pytest.mark.parametrize("name", MINER_NAMES)
def test_state_dict_round_trips_through_weights_only_load(name):
    _, miner, _ = run(name)
    state = miner.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_same_state(state, loaded)
    fresh = make_miner(name)
    if name == "hnm" or fresh.modules().keys() != miner.modules().keys():
        # modules built in on_fit_start need the context first
        _, fresh, _ = run(name, seed=1)
    fresh.load_state_dict(loaded)
    assert_same_state(state, fresh.state_dict())


@pytest.mark.parametrize("name", MINER_NAMES)
def test_resume_after_interrupt_matches_uninterrupted(name, tmp_path):
    full, _, _ = run(name, seed=2, checkpoint_dir=tmp_path / "full")

    class Interrupt(Exception):
        pass

    rows: list[dict] = []

    def stop_after_two(row):
        rows.append(row)
        if len(rows) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(name, seed=2, checkpoint_dir=tmp_path / "cut", on_epoch_end=stop_after_two)
    resumed, _, _ = run(name, seed=2, checkpoint_dir=tmp_path / "cut")
    assert untimed(resumed.history) == untimed(full.history)
    assert_same_state(resumed.best_state, full.best_state)
