"""HNM-WSI miner: pool selection, acceptance, frozen vs fine-tuned encoder, caching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiahnm.config import TrainConfig
from tiahnm.data.bag import Bag
from tiahnm.errors import ConfigError
from tiahnm.heads.dsmil import DSMIL
from tiahnm.heads.end_to_end import EncoderMIL
from tiahnm.losses.ranking import MIRankLoss
from tiahnm.miners.base import FitContext
from tiahnm.miners.hnm import HNMMiner, augment
from tiahnm.miners.hnm_selection import (
    build_pools,
    hard_negative_mask,
    positive_mask,
    pseudo_labels,
    spl_ratio,
    uncertain_negative_mask,
)
from tiahnm.plugins import get_registry
from tiahnm.training.loop import fit, sub_training

CPU = torch.device("cpu")


def a(*v):
    return np.array(v, dtype=np.float64)


# ------------------------------------------------------------------ selection
def test_hard_negatives_are_the_top_fraction_of_negative_slide_patches():
    scores = np.arange(20) / 20.0
    bags = np.zeros(20, dtype=int)
    # Q_0.9 of 0, 0.05 .. 0.95 is 0.855: the two highest
    assert np.flatnonzero(hard_negative_mask(scores, bags, 0.1)).tolist() == [18, 19]
    # 5%: Q_0.95 = 0.9025, only the top patch
    assert np.flatnonzero(hard_negative_mask(scores, bags, 0.05)).tolist() == [19]
    assert hard_negative_mask(scores, bags, 1.0).all()
    # patches of positive slides are never negatives, whatever their score
    mixed_scores = a(0.99, 0.1, 0.8, 0.2, 0.95)
    mixed_bags = np.array([1, 0, 0, 0, 1])
    assert np.flatnonzero(
        hard_negative_mask(mixed_scores, mixed_bags, 0.34)
    ).tolist() == [2]
    # ties at the cut-off are all kept: Q_0.75 of (0.1, 0.2, 0.9, 0.9) is 0.9
    tied = hard_negative_mask(a(0.9, 0.1, 0.9, 0.2), np.zeros(4, int), 0.25)
    assert tied.tolist() == [True, False, True, False]
    assert not hard_negative_mask(a(0.5), np.array([1]), 0.5).any()
    with pytest.raises(ValueError, match="ratio"):
        hard_negative_mask(scores, bags, 0.0)


def test_pseudo_labels_positives_and_uncertain_negatives():
    s = a(0.9, 0.5, 0.31, 0.3, 0.1, 0.05, 0.95)
    y = np.array([1, 1, 1, 1, 1, 1, 0])
    assert pseudo_labels(s, y, 0.3).tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert np.flatnonzero(positive_mask(s, y, 0.3)).tolist() == [0, 1, 2]
    # top half of (0.9, 0.5, 0.31): Q_0.5 = 0.5
    assert np.flatnonzero(positive_mask(s, y, 0.3, 0.5)).tolist() == [0, 1]
    # uncertain negatives (0.3, 0.1, 0.05): Q_0.5 = 0.1, the lowest-scored ones
    assert np.flatnonzero(uncertain_negative_mask(s, y, 0.3, 0.5)).tolist() == [4, 5]
    assert not uncertain_negative_mask(s, y, 0.3, 0.0).any()
    pools = build_pools(
        s,
        y,
        threshold=0.3,
        neg_ratio=1.0,
        pos_ratio=0.5,
        uncertain_ratio=0.5,
        include_uncertain=True,
    )
    assert pools.negatives.tolist() == [4, 5, 6]
    assert pools.hard_negatives.tolist() == [6]
    assert pools.spl_positives.tolist() == [0, 1]


def test_spl_schedule():
    kw = {"start": 0.2, "end": 0.8, "warmup": 2, "ramp_epochs": 4}
    assert [round(spl_ratio(t, **kw), 6) for t in range(8)] == [
        0.2,
        0.2,
        0.2,
        0.35,
        0.5,
        0.65,
        0.8,
        0.8,
    ]


# ------------------------------------------------------------------ helpers
SIDE = 8


def image_bags(n_bags: int = 8, n: int = 6, seed: int = 0) -> list[Bag]:
    """1x8x8 images; positive bags hold 1-2 bright-square witnesses."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        label = i % 2
        x = rng.uniform(0, 0.3, size=(n, 1, SIDE, SIDE)).astype(np.float32)
        if label:
            x[: 1 + i % 3 // 2, :, 2:6, 2:6] = 1.0
        bags.append(Bag(f"img{i:02d}", label, torch.from_numpy(x.reshape(n, -1))))
    return bags


def tiny_head(seed: int = 0) -> EncoderMIL:
    torch.manual_seed(seed)
    return EncoderMIL(
        SIDE * SIDE,
        2,
        encoder_options={"out_dim": 8, "width": 4},
        head="dsmil",
        head_options={"embed_dim": 8, "query_dim": 4, "dropout": 0.0},
    )


def ctx_for(head, round_idx=0, best_score=None, monitor=None) -> FitContext:
    return FitContext(
        head=head,
        device=CPU,
        epochs=1,
        steps_per_epoch=1,
        round=round_idx,
        generator=torch.Generator().manual_seed(0),
        sub=sub_training(CPU),
        round_best_score=best_score,
        monitor=monitor,
    )


def miner(**kw) -> HNMMiner:
    opts = {"batch_size": 20, "finetune_epochs": 1, "warmup": 5, "proj_dim": 4}
    opts.update(kw)
    return HNMMiner(**opts)


# ------------------------------------------------------------------ miner
def test_registered_and_option_errors():
    m = get_registry("miner").create("hnm", neg_ratio=1.0)
    assert isinstance(m, HNMMiner) and m.neg_ratio == 1.0
    for bad in (
        {"neg_ratio": 0.0},
        {"neg_ratio": 1.5},
        {"pair_bags": "all"},
        {"accept_if_improved": "yes"},
        {"batch_size": 1},
        {"augment": "heavy"},
        {"finetune_epochs": -1},
    ):
        with pytest.raises(ConfigError, match=r"miner\.options"):
            HNMMiner(**bad)
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="encoder_mil"):
        HNMMiner().on_fit_start(ctx_for(DSMIL(4, 2, embed_dim=8, query_dim=4)))


def test_pools_map_to_exact_patches():
    bags = image_bags(4, 5)  # labels 0, 1, 0, 1
    scores = {
        "img00": torch.tensor([0.1, 0.9, 0.2, 0.3, 0.4]),
        "img01": torch.tensor([0.8, 0.1, 0.2, 0.7, 0.05]),
        "img02": torch.tensor([0.6, 0.0, 0.0, 0.0, 0.0]),
        "img03": torch.tensor([0.1, 0.1, 0.35, 0.2, 0.1]),
    }
    m = miner(neg_ratio=0.3, threshold=0.3)
    pools, bag_of, inst_of, y = m.pools(bags, scores, epoch=0)
    # 10 negative patches, Q_0.7 = 0.33: 0.9 (img00[1]), 0.4 (img00[4]), 0.6 (img02[0])
    picked = {(bags[bag_of[i]].slide_id, int(inst_of[i])) for i in pools.hard_negatives}
    assert picked == {("img00", 1), ("img00", 4), ("img02", 0)}
    positives = {(bags[bag_of[i]].slide_id, int(inst_of[i])) for i in pools.positives}
    assert positives == {("img01", 0), ("img01", 3), ("img03", 2)}
    assert pools.labels[pools.positives].tolist() == [1, 1, 1]
    assert y.tolist() == [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5


def test_negative_fraction_sets_the_epoch_length():
    bags = image_bags(8, 25)  # 100 negative patches
    head = tiny_head()
    steps = {}
    for ratio in (0.05, 1.0):
        m = miner(neg_ratio=ratio)
        ctx = ctx_for(head)
        m.on_fit_start(ctx)
        scores = m.score_instances(ctx, bags)
        stats = m.finetune(ctx, bags, scores)
        steps[ratio] = stats["hnm_finetune_steps"]
        assert stats["hnm_hard_negatives"] == (5 if ratio == 0.05 else 100)
    # batch 20 with 4 positives: 16 negatives per step
    assert steps == {0.05: 1.0, 1.0: 7.0}


def test_gradients_reach_the_encoder_only_when_fine_tuning():
    torch.manual_seed(0)
    bags = image_bags()
    head = tiny_head()
    enc0 = {k: v.clone() for k, v in head.encoder.state_dict().items()}

    class Spy(HNMMiner):
        grads: list[bool] = []
        tuned: list[bool] = []

        def after_step(self, ctx, step):
            self.grads.append(
                any(p.grad is not None for p in ctx.head.encoder.parameters())
            )

        def on_round_end(self, ctx, train_bags):
            self.seen_state = {
                "monitor": ctx.monitor,
                "best_score": ctx.round_best_score,
            }
            return super().on_round_end(ctx, train_bags)

        def _step(self, ctx, opt, *args):
            loss = super()._step(ctx, opt, *args)
            self.tuned.append(
                all(p.grad is not None for p in ctx.head.encoder.parameters())
            )
            return loss

    m = Spy(batch_size=16, finetune_epochs=1, warmup=0, proj_dim=4, neg_ratio=1.0)
    cfg = TrainConfig(epochs=2, rounds=2, patience=10, lr=1e-3)
    res = fit(head, bags[:6], bags[6:], cfg, miner=m, losses=[(MIRankLoss(k=2), 0.1)])
    assert len(m.grads) == 2 * 2 * 3  # rounds x epochs x (pos, neg) pairs
    assert not any(m.grads)
    assert m.tuned and all(m.tuned)
    # the loop hands over the round's best validation score (val_loss monitor)
    assert m.seen_state["monitor"] == "val_loss"
    assert m.best_val == m.seen_state["best_score"]
    assert m.best_val[0] == -min(r["val_loss"] for r in res.history if r["round"] == 0)
    assert not any(p.requires_grad for p in head.encoder.parameters())
    changed = any(
        not torch.equal(enc0[k], v) for k, v in head.encoder.state_dict().items()
    )
    assert changed
    assert res.history[0]["round"] == 0 and "hnm_finetune_seconds" not in res.history[0]
    row = res.history[-1]
    assert row["round"] == 1 and row["hnm_finetune_steps"] > 0
    assert row["hnm_finetune_seconds"] > 0 and row["hnm_accepted"] == 1.0


def test_mil_rounds_train_on_cached_features_of_the_current_encoder():
    bags = image_bags(4, 5)
    head = tiny_head()
    m = miner(neg_ratio=1.0)
    ctx = ctx_for(head)
    m.on_fit_start(ctx)
    batches = list(m.batches(ctx, bags, torch.Generator().manual_seed(0)))
    assert len(batches) == 2 and all([b.label for b in x] == [1, 0] for x in batches)
    feats = batches[0][0].features
    assert feats.shape == (5, 8)
    with torch.no_grad():
        head.eval()
        images = next(b for b in bags if b.slide_id == batches[0][0].slide_id)
        raw = {
            b.slide_id: head.encoder(b.features.reshape(-1, 1, SIDE, SIDE))
            for b in bags
        }
        flat = torch.cat(list(raw.values()))
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        want = (raw[images.slide_id] - mean) / std
        # standardised with the training patches' statistics, stored in the head
        torch.testing.assert_close(feats, want)
        torch.testing.assert_close(head.feature_mean, mean)
        torch.testing.assert_close(head.feature_std, std)
        # evaluation through the whole head sees the same features as training
        head.head.eval()
        via_head = head(images.features).instance_logits
        via_feats = head.head(feats).instance_logits
        torch.testing.assert_close(via_head, via_feats)
    plain = miner(neg_ratio=1.0, standardize=False)
    plain.on_fit_start(ctx)
    got = plain.mil_features(ctx, bags)
    torch.testing.assert_close(got[images.slide_id], raw[images.slide_id])
    out, extra = m.forward(ctx, feats, torch.tensor([1]), 0)
    assert out.instance_logits.shape == (5, 2) and extra == {}
    first_version = m._cache_version
    m.finetune(ctx, bags, m.score_instances(ctx, bags))
    again = list(m.batches(ctx, bags, torch.Generator().manual_seed(0)))
    assert m._cache_version != first_version
    assert not torch.equal(again[0][0].features, feats)


def test_pseudo_scores_accepted_only_when_validation_improves():
    bags = image_bags(4, 5)
    head = tiny_head()
    m = miner(finetune_epochs=0)
    ctx = ctx_for(head, best_score=(0.8, -0.1), monitor="val_auc")
    m.on_fit_start(ctx)
    m.on_round_end(ctx, bags)
    first = {k: v.clone() for k, v in m.scores.items()}
    assert m.best_val == (0.8, -0.1) and m.log[-1]["hnm_accepted"] == 1.0
    with torch.no_grad():
        head.head.instance_classifier.bias += torch.tensor([0.0, 3.0])
    m.on_round_end(ctx_for(head, 1, best_score=(0.7, 0.0), monitor="val_auc"), bags)
    assert m.log[-1]["hnm_accepted"] == 0.0
    assert all(torch.equal(first[k], m.scores[k]) for k in first)
    # reinit_head reset the inner head: the bias change is gone
    assert torch.equal(
        head.head.instance_classifier.bias, m._init_head["instance_classifier.bias"]
    )
    with torch.no_grad():
        head.head.instance_classifier.bias += torch.tensor([0.0, 3.0])
    always = miner(finetune_epochs=0, accept_if_improved=False)
    always.on_fit_start(ctx)
    always.best_val, always.scores = (0.9, 0.0), first
    always.on_round_end(
        ctx_for(head, 1, best_score=(0.1, 0.0), monitor="val_auc"), bags
    )
    assert always.log[-1]["hnm_accepted"] == 1.0
    assert not torch.equal(always.scores["img00"], first["img00"])


def test_disk_cache_and_state_round_trip(tmp_path):
    bags = image_bags(2, 3)
    head = tiny_head()
    m = miner(cache_dir=str(tmp_path))
    ctx = ctx_for(head)
    m.on_fit_start(ctx)
    feats = m.features(ctx, bags)
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == 2 and files[0].parent.name.startswith("r0_")
    other = miner(cache_dir=str(tmp_path))
    other.on_fit_start(ctx)
    torch.save(torch.full((3, 8), 7.0), files[0])  # proves the file is read back
    loaded = other.features(ctx, bags)
    assert any(torch.equal(v, torch.full((3, 8), 7.0)) for v in loaded.values())
    assert torch.equal(loaded["img01"], feats["img01"]) or torch.equal(
        loaded["img00"], feats["img00"]
    )
    m.scores = m.score_instances(ctx, bags)
    m.finetune_epoch, m.best_val = 3, (0.5, 0.0)
    state = m.state_dict()
    back = miner()
    back.on_fit_start(ctx)
    back.load_state_dict(state)
    assert back.finetune_epoch == 3 and back.best_val == (0.5, 0.0)
    assert back.generator.get_state().equal(m.generator.get_state())
    for k, v in m.projector.state_dict().items():
        assert torch.equal(v, back.projector.state_dict()[k])


def test_augment_is_reproducible_and_in_range():
    x = torch.rand(6, 3, 8, 8)
    v1 = augment(x, torch.Generator().manual_seed(1))
    v2 = augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(v1, v2) and v1.shape == x.shape
    assert v1.min() >= 0 and v1.max() <= 1 and not torch.equal(v1, x)
    assert torch.equal(augment(x, torch.Generator(), "none"), x)


def test_finetuning_steps_run_under_the_run_precision():
    """SupCon steps go through ctx.sub: in a bf16 run the encoder and projector
    compute in bf16, each step changes the encoder, and the loss is finite."""
    bags = image_bags(4, 5)
    head = tiny_head()
    m = miner(neg_ratio=1.0)
    ctx = ctx_for(head)
    ctx.sub = sub_training(CPU, dtype=torch.bfloat16)
    m.on_fit_start(ctx)
    dtypes = []
    m.projector.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    before = {k: v.clone() for k, v in head.encoder.state_dict().items()}
    m.on_round_end(ctx, bags)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert math.isfinite(m.log[-1]["hnm_supcon_loss"])
    assert any(
        not torch.equal(before[k], v) for k, v in head.encoder.state_dict().items()
    )
