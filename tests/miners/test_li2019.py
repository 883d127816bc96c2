"""Li et al. 2019: adaptive weighting (eq. 2), hard-negative mining (eq. 3), bag
generation (SB/MB/FMB), retraining rounds, no leaks into val/test, determinism."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.config import TrainConfig, from_dict
from tiahnm.crossval import run_training
from tiahnm.data.bag import Bag
from tiahnm.errors import ConfigError
from tiahnm.heads.abmil import ABMIL, AttentionPool, GatedABMIL
from tiahnm.heads.adaptive import adaptive_weights, pseudo_negative_mask
from tiahnm.heads.pooling import MeanPoolingMIL
from tiahnm.hookspecs import hookimpl
from tiahnm.miners.base import FitContext
from tiahnm.miners.li2019 import (
    HardNegatives,
    Li2019Miner,
    hard_negative_mask,
    kmeans_labels,
    sample_bag_sizes,
    sample_from_clusters,
    sample_uniform,
    stratified_folds,
)
from tiahnm.plugins import get_plugin_manager, get_registry
from tiahnm.training.loop import fit, sub_training

CPU = torch.device("cpu")
DIM = 6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_head(cls=ABMIL, seed: int = 0, **options) -> ABMIL:
    torch.manual_seed(seed)
    return cls(DIM, embed_dim=8, attn_dim=4, dropout=0.0, **options)


def ctx_for(head, round_idx: int = 0, seed: int = 0) -> FitContext:
    return FitContext(
        head=head,
        device=CPU,
        epochs=1,
        steps_per_epoch=1,
        round=round_idx,
        generator=gen(seed),
        sub=sub_training(CPU),
    )


# ------------------------------------------------------------------ eq. 2
def test_adaptive_weights_hand_computed():
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # mean 0.25: 0.1 and 0.2 pseudo-negative
    assert pseudo_negative_mask(a).tolist() == [[True, True, False, False]]
    w = adaptive_weights(a, 2.0)
    assert torch.allclose(w, torch.tensor([[0.2, 0.4, 0.3, 0.4]]))
    w = adaptive_weights(a, 2.0, renormalise=True)
    assert torch.allclose(w, torch.tensor([[0.2, 0.4, 0.3, 0.4]]) / 1.3)
    # per branch: each row thresholds on its own mean
    two = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert pseudo_negative_mask(two).tolist() == [
        [False, True, True],
        [True, True, False],
    ]


@pytest.mark.parametrize("cls", [ABMIL, GatedABMIL])
def test_abmil_adaptive_pooling_train_only_and_differentiable(cls):
    head = tiny_head(cls, adaptive_lambda=2.0)
    x = torch.randn(7, DIM, generator=gen(1))
    head.train()
    out = head(x)
    a = out.attention
    expected = torch.where(a < a.mean(-1, keepdim=True), 2 * a, a)
    assert torch.allclose(out.extras["pooling_weights"], expected)
    assert torch.allclose(out.bag_embedding, expected @ out.instance_embeddings)
    assert torch.allclose(a.sum(), torch.tensor(1.0))  # attention stays eq. 1
    head.loss(out, torch.tensor([1])).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.attention.w.weight.grad.abs().sum() > 0
    # evaluation: plain attention pooling, no extras
    head.eval()
    out = head(x)
    assert "pooling_weights" not in out.extras
    assert torch.allclose(out.bag_embedding, out.attention @ out.instance_embeddings)
    # off by default: training pools with plain attention too
    plain = tiny_head(cls)
    plain.train()
    out = plain(x)
    assert not out.extras
    assert torch.allclose(out.bag_embedding, out.attention @ out.instance_embeddings)


def test_softsign_attention_is_eq1():
    pool = AttentionPool(4, 3, gated=False, act="softsign")
    h = torch.randn(5, 4, generator=gen(2))
    expected = pool.w(F.softsign(pool.V(h))).T
    assert torch.allclose(pool(h), expected)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"adaptive_lambda": 0}, "head.options.adaptive_lambda"),
        ({"adaptive_lambda": "2"}, "head.options.adaptive_lambda"),
        ({"adaptive_renormalise": 1}, "head.options.adaptive_renormalise"),
        ({"attn_act": "relu"}, "head.options.attn_act"),
    ],
)
def test_bad_head_options(options, key):
    with pytest.raises(ConfigError, match=key):
        get_registry("head").create("abmil", DIM, 2, key="head.options", **options)


# ------------------------------------------------------------------ eq. 3
def test_hard_negative_rule_hand_computed():
    # mean 0.25, population std sqrt(0.0125) = 0.1118: threshold 0.3618
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert hard_negative_mask(w).tolist() == [False, False, False, True]
    # mean 0.2, std 0.3: threshold 0.5
    w = torch.tensor([0.05, 0.05, 0.05, 0.05, 0.8])
    assert hard_negative_mask(w).tolist() == [False] * 4 + [True]
    # two weights: mean + std equals the larger one exactly (>=, kept)
    assert hard_negative_mask(torch.tensor([0.3, 0.7])).tolist() == [False, True]
    # [1, 1, 1, 0]: mean 0.75, std 0.433, nothing reaches 1.183
    w = torch.tensor([1.0, 1.0, 1.0, 0.0]) / 3
    assert not hard_negative_mask(w).any()
    # uniform: std 0, all kept; std_scale 0 keeps w >= mean
    assert hard_negative_mask(torch.full((4,), 0.25)).all()
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert hard_negative_mask(w, std_scale=0.0).tolist() == [False, False, True, True]


# ------------------------------------------------------------------ generation parts
def test_bag_sizes_respect_the_clip():
    sizes = [4, 5, 6, 30]
    draws = sample_bag_sizes(sizes, 4000, gen(0))
    assert all(isinstance(n, int) for n in draws)
    assert min(draws) == 4 and max(draws) == 30  # mean 11.25, std 10.8: both clip
    assert abs(sum(draws) / len(draws) - 11.25) < 1.5
    assert sample_bag_sizes([7, 7, 7], 50, gen(0)) == [7] * 50


def test_cluster_sampling_frequencies():
    labels = torch.tensor([2, 0, 1, 2, 1, 2, 1, 2, 2, 2])  # N = 1, 3, 6
    n = 30000
    idx = sample_from_clusters(labels, n, gen(3))
    picked = labels[idx]
    freq = torch.bincount(picked, minlength=3).double() / n
    assert torch.allclose(
        freq, torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64), atol=0.015
    )
    # members of a cluster are uniform: each instance of cluster 2 ~ 0.6 / 6
    per_instance = torch.bincount(idx, minlength=10).double() / n
    assert torch.allclose(
        per_instance[labels == 2], torch.full((6,), 0.1, dtype=torch.float64), atol=0.01
    )


def test_uniform_sampling_and_kmeans():
    idx = sample_uniform(10, 6, gen(0))
    assert len(set(idx.tolist())) == 6
    idx = sample_uniform(4, 9, gen(0))
    assert len(idx) == 9 and set(idx.tolist()) == {0, 1, 2, 3}
    pts = torch.cat([torch.zeros(5, 2), torch.full((3, 2), 10.0)]).numpy()
    labels = kmeans_labels(pts, 4, seed=0)  # two distinct rows: two clusters
    assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1
    assert labels[0] != labels[5]


# ------------------------------------------------------------------ the miner
def train_bags():
    return make_bags(12, DIM, seed=4, min_n=5, max_n=9)


def rows_of(bags):
    return {tuple(r) for b in bags for r in b.features.tolist()}


@pytest.mark.parametrize(
    ("mode", "space"),
    [("sb", "input"), ("mb", "input"), ("fmb", "input"), ("fmb", "embedding")],
)
def test_modes_generate_negative_bags(mode, space):
    bags = train_bags()
    head = tiny_head()
    miner = Li2019Miner(
        mode=mode, n_bags=4, n_clusters=3, feature_space=space, fp_threshold=0.0
    )
    ctx = ctx_for(head, round_idx=1)
    miner.on_fit_start(ctx)
    head.train()
    new = miner.on_round_end(ctx, bags)
    assert head.training  # mode restored
    negatives = [b for b in bags if b.label == 0]
    mined = miner.mine(head, bags, CPU)
    assert mined.n_false_positive_bags == mined.n_negative_bags == len(negatives)
    assert len(new) == (1 if mode == "sb" else 4)
    for i, b in enumerate(new):
        assert b.label == 0 and b.origin == "generated"
        assert b.slide_id == f"generated_r1_{i:04d}"
        assert rows_of([b]) <= rows_of(negatives)
        if mode != "sb":
            assert 5 <= b.n_instances <= 9
    if mode == "sb":
        assert new[0].n_instances == mined.features.shape[0]
    stats = miner.epoch_stats()
    assert stats["li2019_generated_bags"] == len(new)
    assert stats["li2019_fp_bags"] == len(negatives)


def test_mining_uses_eq3_on_eval_attention():
    bags = train_bags()
    head = tiny_head(adaptive_lambda=2.0)
    miner = Li2019Miner(fp_threshold=0.0)
    mined = miner.mine(head, bags, CPU)
    head.eval()
    expected = []
    with torch.no_grad():
        for b in bags:
            if b.label == 0:
                a = head(b.features).attention[0]
                expected.append(b.features[hard_negative_mask(a)])
    assert torch.equal(mined.features, torch.cat(expected))
    assert mined.embeddings.shape == (len(mined.features), 8)


def test_no_false_positives_no_bags(caplog):
    head = tiny_head()
    miner = Li2019Miner(fp_threshold=1.0)  # untrained head never reaches p = 1
    ctx = ctx_for(head)
    miner.on_fit_start(ctx)
    with caplog.at_level(logging.INFO, logger="tiahnm.miners.li2019"):
        assert miner.on_round_end(ctx, train_bags()) == []
    assert miner.epoch_stats()["li2019_fp_bags"] == 0
    assert miner.epoch_stats()["li2019_generated_bags"] == 0
    assert "no bags generated" in caplog.text


@pytest.mark.parametrize("reinit", [True, False])
def test_reinit_restores_the_initial_head(reinit):
    head = tiny_head()
    init = {k: v.clone() for k, v in head.state_dict().items()}
    miner = Li2019Miner(mode="sb", fp_threshold=0.0, reinit=reinit)
    ctx = ctx_for(head)
    miner.on_fit_start(ctx)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in head.state_dict().items()}
    miner.on_round_end(ctx, train_bags())
    want = init if reinit else trained
    assert all(torch.equal(head.state_dict()[k], v) for k, v in want.items())


def test_needs_attention_head():
    head = MeanPoolingMIL(DIM, embed_dim=8)
    with pytest.raises(ConfigError, match="li2019"):
        Li2019Miner().on_fit_start(ctx_for(head))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"mode": "xx"}, "mode"),
        ({"n_bags": 0}, "n_bags"),
        ({"n_clusters": 2.5}, "n_clusters"),
        ({"feature_space": "pixels"}, "feature_space"),
        ({"fp_threshold": 1.5}, "fp_threshold"),
        ({"std_scale": -1}, "std_scale"),
        ({"reinit": "yes"}, "reinit"),
    ],
)
def test_bad_miner_options(options, key):
    with pytest.raises(ConfigError, match=f"miner.options.{key}"):
        get_registry("miner").create("li2019", key="miner.options", **options)


def test_generator_state_round_trip():
    miner = Li2019Miner(fp_threshold=0.0, n_bags=3, n_clusters=2)
    ctx = ctx_for(tiny_head(), seed=5)
    miner.on_fit_start(ctx)
    state = miner.state_dict()
    mined = miner.mine(ctx.head, train_bags(), CPU)
    first = miner.generate(mined, [5, 6, 9], round_idx=0)
    miner.load_state_dict(state)
    again = miner.generate(mined, [5, 6, 9], round_idx=0)
    assert [
        torch.equal(a.features, b.features) for a, b in zip(first, again, strict=True)
    ] == [True] * 3
    empty = HardNegatives(torch.zeros(0, DIM), torch.zeros(0, 8), 3, 0)
    assert miner.generate(empty, [5], round_idx=0) == []


# ------------------------------------------------------------------ loop / CV
def fit_once(seed: int = 0):
    head = tiny_head(adaptive_lambda=2.0, seed=seed)
    bags = make_bags(16, DIM, seed=1, min_n=4, max_n=8)
    cfg = TrainConfig(epochs=2, rounds=2, lr=0.01, progress=False)
    miner = Li2019Miner(mode="fmb", n_bags=3, n_clusters=2, fp_threshold=0.0)
    return fit(head, bags[:12], bags[12:], cfg, miner=miner, seed=seed), miner


def test_two_rounds_deterministic():
    (a, miner_a), (b, _) = fit_once(), fit_once()
    gen_a = [x for x in a.train_bags if x.origin == "generated"]
    gen_b = [x for x in b.train_bags if x.origin == "generated"]
    assert len(gen_a) == 3 and [x.slide_id for x in gen_a] == [
        f"generated_r0_{i:04d}" for i in range(3)
    ]
    assert all(
        torch.equal(x.features, y.features) for x, y in zip(gen_a, gen_b, strict=True)
    )
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert [r["round"] for r in a.history] == [0, 0, 1, 1]
    assert a.history[-1]["li2019_generated_bags"] == 3
    assert len(miner_a.state_dict()["log"]) == 1


SPIES: list[SpyLi2019] = []


class SpyLi2019(Li2019Miner):
    """Records the bags trained on and the bags handed to ``on_round_end``."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.seen: set[str] = set()
        self.mined_from: set[str] = set()
        SPIES.append(self)

    def batches(self, ctx, bags, generator):
        for batch in super().batches(ctx, bags, generator):
            self.seen.update(b.slide_id for b in batch)
            yield batch

    def on_round_end(self, ctx, train_bags):
        self.mined_from.update(b.slide_id for b in train_bags)
        return super().on_round_end(ctx, train_bags)


class SpyPlugin:
    @hookimpl
    def tiahnm_register_miners(self, register):
        register("li2019_spy", SpyLi2019)


def test_generated_bags_never_reach_val_or_test(tmp_path):
    # (cv.refit with train.rounds > 1 is refused: tests/test_config.py)
    SPIES.clear()
    get_plugin_manager().register(SpyPlugin(), name="li2019_spy")
    csv_path = tmp_path / "bags.csv"
    write_mil_csv(csv_path, make_bags(18, DIM, seed=2, min_n=4, max_n=8))
    cfg = from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "data": {"source": "mil_csv", "options": {"path": str(csv_path)}},
            "head": {
                "name": "abmil",
                "options": {"embed_dim": 8, "attn_dim": 4, "adaptive_lambda": 2.0},
            },
            "miner": {
                "name": "li2019_spy",
                "options": {
                    "mode": "fmb",
                    "n_bags": 2,
                    "n_clusters": 2,
                    "fp_threshold": 0.0,
                },
            },
            "train": {"epochs": 2, "rounds": 2, "lr": 0.01, "progress": False},
            "cv": {"folds": 3, "repeats": 1, "val_fraction": 0.2},
            "evaluation": {"report": False},
        }
    )
    run_training(cfg)
    out = tmp_path / "out"
    splits: dict[str, dict[str, set[str]]] = {}
    with open(out / "splits.csv") as fh:
        for row in csv.DictReader(fh):
            key = f"r{row['repeat']}_f{row['fold']}"
            splits.setdefault(key, {"train": set(), "val": set(), "test": set()})
            splits[key][row["split"]].add(row["slide_id"])
    assert all(
        not i.startswith("generated")
        for s in splits.values()
        for v in s.values()
        for i in v
    )
    spies = SPIES[1:]  # the first is built only to validate the config
    assert len(spies) == len(splits)
    for i, name in enumerate(sorted(splits)):
        split = splits[name]
        result = json.loads((out / "folds" / name / "result.json").read_text())
        assert result["n_generated"] == 2
        assert {p["slide_id"] for p in result["predictions"]} == split["test"]
        first = spies[i]
        generated = {s for s in first.seen if s.startswith("generated_")}
        assert generated == {"generated_r0_0000", "generated_r0_0001"}
        assert first.seen - generated == split["train"]
        assert first.mined_from == split["train"]
    with open(out / "predictions.csv") as fh:
        assert not any(
            r["slide_id"].startswith("generated") for r in csv.DictReader(fh)
        )


# ------------------------------------------------------------------ fp_source
def fixed_example():
    """12 bags and an untrained head: negatives with p(positive) 0.509, 0.511, 0.468,
    0.516, 0.524, 0.528; eq. 3 keeps one instance of the first four, none of the
    last two."""
    return make_bags(12, DIM, seed=4, min_n=5, max_n=9), tiny_head(seed=3)


def test_default_fp_source_mines_the_same_set():
    bags, head = fixed_example()
    init = {k: v.clone() for k, v in head.state_dict().items()}
    miner = Li2019Miner(mode="sb", fp_threshold=0.5)
    assert miner.fp_source == "train"
    ctx = ctx_for(head, seed=7)
    miner.on_fit_start(ctx)
    (new,) = miner.on_round_end(ctx, bags)
    by_id = {b.slide_id: b for b in bags}
    hard = torch.stack(
        [
            by_id["bag000"].features[1],
            by_id["bag002"].features[2],
            by_id["bag006"].features[1],
        ]
    )
    assert torch.equal(new.features, hard)  # bag004 is below 0.5
    assert miner.log == [
        {
            "li2019_round": 0.0,
            "li2019_negative_bags": 6.0,
            "li2019_fp_bags": 5.0,
            "li2019_hard_instances": 3.0,
            "li2019_generated_bags": 1.0,
            "li2019_out_of_fold": 0.0,
        }
    ]
    assert all(torch.equal(head.state_dict()[k], v) for k, v in init.items())
    # FMB from the same set, recorded before fp_source existed (rows of `hard`)
    bags, head = fixed_example()
    miner = Li2019Miner(mode="fmb", n_bags=3, n_clusters=2, fp_threshold=0.5)
    ctx = ctx_for(head, seed=7)
    miner.on_fit_start(ctx)
    new = miner.on_round_end(ctx, bags)
    picked = [
        [next(j for j in range(3) if torch.equal(row, hard[j])) for row in b.features]
        for b in new
    ]
    assert picked == [
        [0, 1, 2, 0, 2, 2, 1],
        [0, 2, 2, 1, 2, 0, 0, 0, 2],
        [1, 2, 0, 1, 0, 2, 0],
    ]


class OofSpy(Li2019Miner):
    """Records the bags each model is asked to mine."""

    def __init__(self, **options) -> None:
        super().__init__(fp_source="out_of_fold", **options)
        self.predicted: list[tuple[object, list[str]]] = []

    def mine(self, head, bags, device):
        self.predicted.append((head, [b.slide_id for b in bags]))
        return super().mine(head, bags, device)


@pytest.fixture
def inner_fits(monkeypatch):
    """Spy on the shared loop as the out-of-fold models call it."""
    import tiahnm.training.loop as loop

    calls: list[dict] = []
    real_fit = loop.fit

    def spy(head, train, val, cfg, **kwargs):
        calls.append(
            {
                "head": head,
                "train": [b.slide_id for b in train],
                "val": list(val),
                "cfg": cfg,
                "start": {k: v.clone() for k, v in head.state_dict().items()},
                "seed": kwargs["seed"],
            }
        )
        return real_fit(head, train, val, cfg, **kwargs)

    monkeypatch.setattr(loop, "fit", spy)
    return calls


def with_generated_bag(bags):
    extra = Bag(
        slide_id="generated_r0_0000",
        label=0,
        features=torch.randn(5, DIM, generator=gen(9)),
        origin="generated",
    )
    return [*bags, extra]


def test_out_of_fold_holds_every_bag_out_once(inner_fits):
    real = train_bags()  # 6 negative, 6 positive
    bags = with_generated_bag(real)
    head = tiny_head()
    init = {k: v.clone() for k, v in head.state_dict().items()}
    miner = OofSpy(mode="sb", fp_threshold=0.0, reinit=False, oof_epochs=2)
    ctx = ctx_for(head, round_idx=0)
    miner.on_fit_start(ctx)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.5)  # "trained": differs from the initial state
    trained = {k: v.clone() for k, v in head.state_dict().items()}
    (new,) = miner.on_round_end(ctx, bags)

    real_ids = {b.slide_id for b in real}
    label = {b.slide_id: b.label for b in real}
    assert len(inner_fits) == len(miner.predicted) == 3
    held_out = []
    for call, (model, predicted) in zip(inner_fits, miner.predicted, strict=True):
        assert model is call["head"] and model is not head
        assert not set(call["train"]) & set(predicted)  # never predicts its own bags
        assert set(call["train"]) | set(predicted) == real_ids
        assert call["val"] == []
        assert call["cfg"].epochs == call["cfg"].patience == 2
        assert call["cfg"].scheduler == "none" and call["cfg"].lr == 5e-4
        assert call["cfg"].weight_decay == 1e-4
        assert all(torch.equal(call["start"][k], v) for k, v in init.items())
        # stratified: 2 negatives and 2 positives held out per fold
        assert sorted(label[i] for i in predicted) == [0, 0, 1, 1]
        held_out += predicted
    assert sorted(held_out) == sorted(real_ids)  # every real bag exactly once
    assert len({c["seed"] for c in inner_fits}) == 3
    # the round's model is untouched (reinit=False), generation is unchanged
    assert all(torch.equal(head.state_dict()[k], v) for k, v in trained.items())
    assert new.origin == "generated" and new.label == 0
    negatives = [b for b in real if b.label == 0]
    assert rows_of([new]) <= rows_of(negatives)  # not from the generated bag
    row = miner.epoch_stats()
    assert row["li2019_out_of_fold"] == 1.0
    assert row["li2019_negative_bags"] == row["li2019_fp_bags"] == 6


def test_stratified_folds():
    labels = [0] * 7 + [1] * 5
    folds = stratified_folds(labels, 3, gen(0))
    assert sorted(i for f in folds for i in f) == list(range(12))
    assert sorted(len(f) for f in folds) == [4, 4, 4]
    for c, n in ((0, 7), (1, 5)):
        counts = [sum(labels[i] == c for i in f) for f in folds]
        assert max(counts) - min(counts) <= 1 and sum(counts) == n
    assert folds == stratified_folds(labels, 3, gen(0))
    assert folds != stratified_folds(labels, 3, gen(1))


OOF_FMB = {
    "fp_source": "out_of_fold",
    "mode": "fmb",
    "n_bags": 3,
    "n_clusters": 2,
    "fp_threshold": 0.0,
    "oof_epochs": 2,
}


def oof_round(seed: int):
    bags = train_bags()
    miner = Li2019Miner(**OOF_FMB)
    ctx = ctx_for(tiny_head(), seed=seed)
    miner.on_fit_start(ctx)
    state = miner.state_dict()
    return miner.on_round_end(ctx, bags), miner, state


def test_out_of_fold_is_deterministic_and_checkpointed():
    a, miner, state = oof_round(seed=3)
    b, _, _ = oof_round(seed=3)
    assert len(a) == len(b) == 3
    assert all(torch.equal(x.features, y.features) for x, y in zip(a, b, strict=True))
    # a miner restored from the state before the round end repeats it
    again = Li2019Miner(**OOF_FMB)
    ctx = ctx_for(tiny_head(), seed=99)
    again.on_fit_start(ctx)
    again.load_state_dict(state)
    c = again.on_round_end(ctx, train_bags())
    assert all(torch.equal(x.features, y.features) for x, y in zip(a, c, strict=True))
    assert miner.generator.get_state().equal(again.generator.get_state())


def test_out_of_fold_finds_false_positives_the_round_model_fits():
    # bag000 (negative) holds one positive-looking instance (first axis +4, as the
    # positive witnesses) with a marker on the second axis that no other bag has:
    # trained on, it is fitted; held out, it looks positive.
    bags = make_bags(18, DIM, seed=5, min_n=4, max_n=7)
    trap = bags[0]
    assert trap.label == 0
    trap.features[0, 0] += 4.0
    trap.features[0, 1] += 8.0
    cfg = TrainConfig(epochs=20, lr=0.02, scheduler="none", progress=False)
    logs = {}
    for source in ("train", "out_of_fold"):
        head = tiny_head(seed=1)
        miner = Li2019Miner(mode="sb", fp_source=source, oof_lr=0.02)
        ctx = ctx_for(head)
        ctx.epochs = cfg.epochs
        miner.on_fit_start(ctx)
        head.load_state_dict(fit(head, bags, [], cfg, seed=0).best_state)
        new = miner.on_round_end(ctx, bags)
        logs[source] = miner.epoch_stats()
        if source == "train":
            assert new == []
        else:
            (bag,) = new
            assert tuple(trap.features[0].tolist()) in rows_of([bag])
    assert logs["train"]["li2019_fp_bags"] == 0
    assert logs["out_of_fold"]["li2019_fp_bags"] >= 1
    assert logs["out_of_fold"]["li2019_negative_bags"] == 9


def test_out_of_fold_falls_back_without_both_classes(caplog, inner_fits):
    # one positive bag: the fold holding it out trains on negatives only
    bags = [b for b in train_bags() if b.label == 0] + [train_bags()[1]]
    head = tiny_head()
    miner = OofSpy(mode="sb", fp_threshold=0.0, oof_folds=2, oof_epochs=1)
    ctx = ctx_for(head)
    miner.on_fit_start(ctx)
    with caplog.at_level(logging.WARNING, logger="tiahnm.miners.li2019"):
        miner.on_round_end(ctx, bags)
    assert "lack a positive or a negative bag" in caplog.text
    assert len(miner.predicted) == 2 and len(inner_fits) == 1
    fallback = [ids for model, ids in miner.predicted if model is head]
    assert len(fallback) == 1 and "bag001" in fallback[0]
    assert miner.epoch_stats()["li2019_fp_bags"] == 6


def test_out_of_fold_in_the_loop_keeps_val_out(inner_fits):
    head = tiny_head(adaptive_lambda=2.0)
    bags = make_bags(16, DIM, seed=1, min_n=4, max_n=8)
    cfg = TrainConfig(epochs=2, rounds=2, lr=0.01, progress=False)
    miner = OofSpy(mode="mb", n_bags=2, fp_threshold=0.0, oof_epochs=1)
    res = fit(head, bags[:12], bags[12:], cfg, miner=miner, seed=0)
    val_ids = {b.slide_id for b in bags[12:]}
    assert len(inner_fits) == 3
    assert not any(set(c["train"]) & val_ids for c in inner_fits)
    assert not any(set(ids) & val_ids for _, ids in miner.predicted)
    generated = [b for b in res.train_bags if b.origin == "generated"]
    assert [b.slide_id for b in generated] == ["generated_r0_0000", "generated_r0_0001"]
    assert res.history[-1]["li2019_out_of_fold"] == 1.0


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"fp_source": "val"}, "fp_source"),
        ({"fp_source": None}, "fp_source"),
        ({"oof_folds": 1}, "oof_folds"),
        ({"oof_folds": 2.0}, "oof_folds"),
        ({"oof_folds": True}, "oof_folds"),
        ({"oof_epochs": 0}, "oof_epochs"),
        ({"oof_lr": 0}, "oof_lr"),
        ({"oof_lr": "1e-3"}, "oof_lr"),
        ({"oof_weight_decay": -1e-4}, "oof_weight_decay"),
    ],
)
def test_bad_out_of_fold_options(options, key):
    with pytest.raises(ConfigError, match=f"miner.options.{key}"):
        get_registry("miner").create("li2019", key="miner.options", **options)
