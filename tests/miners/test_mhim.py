"""MHIM-MIL miner: masking, schedules, EMA teacher, GRN, consistency, loop and CLI."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.cli import cli
from tiahnm.config import TrainConfig
from tiahnm.errors import ConfigError
from tiahnm.heads.abmil import ABMIL
from tiahnm.heads.dsmil import DSMIL
from tiahnm.heads.pooling import MeanPoolingMIL
from tiahnm.heads.transmil import TransMIL
from tiahnm.miners.base import FitContext
from tiahnm.miners.mhim import PRESETS, MHIMMiner, consistency_loss
from tiahnm.miners.mhim_masking import (
    build_mask,
    cosine_schedule,
    fused_topk,
    high_mask,
    low_mask,
    random_mask,
    ratio_count,
)
from tiahnm.miners.recycle import GlobalRecycleNetwork
from tiahnm.plugins import get_registry
from tiahnm.runtime.checkpoint import save_checkpoint
from tiahnm.training.loop import fit

CPU = torch.device("cpu")
# Distinct scores; ranking (high to low): 3, 7, 0, 9, 5, 1, 8, 2, 6, 4.
SCORES = torch.tensor([0.70, 0.40, 0.20, 0.95, 0.05, 0.50, 0.10, 0.90, 0.30, 0.60])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny bags: one thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def as_set(idx):
    return set(idx.tolist())


# --------------------------------------------------------------------- masking
def test_ratio_count_is_robust_ceil():
    assert ratio_count(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert ratio_count(0.25, 10) == 3
    assert ratio_count(0.01, 10) == 1
    assert ratio_count(0.0, 10) == 0
    assert ratio_count(1.0, 10) == 10


def test_high_mask_plain_ham_masks_exact_top():
    idx = high_mask(SCORES, 0.2, 1.0, generator=gen())
    assert as_set(idx) == {3, 7}
    assert as_set(high_mask(SCORES, 0.3, 1.0)) == {3, 7, 0}


def test_low_mask_masks_exact_bottom():
    assert as_set(low_mask(SCORES, 0.3)) == {4, 6, 2}
    assert low_mask(SCORES, 0.0).numel() == 0


def test_random_mask_count_and_determinism():
    a = random_mask(10, 0.25, generator=gen(1))
    b = random_mask(10, 0.25, generator=gen(1))
    assert a.numel() == 3 and len(as_set(a)) == 3 and torch.equal(a, b)
    assert all(0 <= i < 10 for i in a.tolist())
    assert random_mask(10, 0.0, generator=gen(1)).numel() == 0


def test_randomly_ham_masks_half_of_top_candidates():
    # beta_h 0.2, rho_h 0.5: candidates = top ceil(10 * 0.4) = 4, masked ceil(2) = 2.
    seen = set()
    for seed in range(20):
        idx = high_mask(SCORES, 0.2, 0.5, generator=gen(seed))
        assert idx.numel() == 2 and as_set(idx) <= {3, 7, 0, 9}
        seen.add(frozenset(idx.tolist()))
    assert len(seen) > 1  # really random among the candidates
    # beta_h / rho_h > 1: every instance is a candidate, ceil(beta_h * N) masked.
    assert high_mask(SCORES, 0.6, 0.5, generator=gen()).numel() == 6


def test_build_mask_union_and_ascending_keep():
    res = build_mask(SCORES, ratio_h=0.2, ratio_l=0.3, generator=gen())
    assert res.keep_idx.tolist() == [0, 1, 5, 8, 9]
    res = build_mask(SCORES, ratio_h=0.2, ratio_l=0.3, ratio_r=0.5, generator=gen(3))
    assert res.random_idx.numel() == 5
    union = as_set(res.random_idx) | {3, 7} | {4, 6, 2}
    expected = sorted(set(range(10)) - union)
    assert res.keep_idx.tolist() == expected  # overlaps are not refilled


def test_build_mask_always_keeps_one_instance():
    res = build_mask(SCORES, ratio_r=1.0, generator=gen())
    assert res.keep_idx.numel() == 1 and res.restored == 1
    res = build_mask(SCORES, ratio_h=1.0, generator=gen())
    assert res.keep_idx.tolist() == [4]  # everything is high: keep the lowest
    res = build_mask(SCORES, ratio_h=0.2, ratio_l=0.8, generator=gen())
    assert res.keep_idx.numel() == 1 and res.keep_idx.item() not in (3, 7)
    res = build_mask(torch.tensor([0.3]), ratio_h=0.01, generator=gen())
    assert res.keep_idx.tolist() == [0]


def test_vote_fusion_differs_from_mean_and_breaks_ties_by_mean():
    scores = torch.tensor(
        [
            [0.30, 0.25, 0.20, 0.15, 0.10],
            [0.30, 0.25, 0.20, 0.15, 0.10],
            [0.01, 0.00, 0.02, 0.03, 0.94],
        ]
    )
    # Votes for the top 2: {0, 1} twice, {4, 3} once -> 0 and 1 win.
    assert as_set(fused_topk(scores, 2, fusion="vote")) == {0, 1}
    # Head mean: 4 (0.38) and 0 (0.2033) are the largest.
    assert as_set(fused_topk(scores, 2, fusion="mean")) == {4, 0}
    # One vote each for 0 and 4 (k = 1): the larger head mean (4) wins.
    assert as_set(fused_topk(scores[1:], 1, fusion="vote")) == {4}
    # Bottom-k vote: {4, 3} twice, {1, 0} once -> 4 and 3.
    assert as_set(fused_topk(scores, 2, largest=False, fusion="vote")) == {3, 4}
    res = build_mask(scores, ratio_h=0.4, generator=gen(), fusion="vote")
    assert res.keep_idx.tolist() == [2, 3, 4]


# ------------------------------------------------------------------- schedules
def test_cosine_schedules_hand_computed():
    assert cosine_schedule(0.01, 0.0, 0, 100) == pytest.approx(0.01)
    assert cosine_schedule(0.01, 0.0, 25, 100) == pytest.approx(0.00853553390593)
    assert cosine_schedule(0.01, 0.0, 50, 100) == pytest.approx(0.005)
    assert cosine_schedule(0.01, 0.0, 100, 100) == pytest.approx(0.0)
    miner = MHIMMiner(
        mask_ratio_h=0.02,
        mask_h_schedule="cosine",
        momentum=0.99,
        momentum_schedule="cosine",
    )
    assert miner.mask_ratio_h_at(0, 40) == pytest.approx(0.02)
    assert miner.mask_ratio_h_at(20, 40) == pytest.approx(0.01)
    assert miner.mask_ratio_h_at(30, 40) == pytest.approx(0.02 * (1 - 0.5**0.5) / 2)
    assert miner.momentum_at(0, 40) == pytest.approx(0.99)
    assert miner.momentum_at(20, 40) == pytest.approx(0.995)
    assert miner.momentum_at(10, 40) == pytest.approx(1 - 0.01 * (1 + 0.5**0.5) / 2)
    assert miner.momentum_at(40, 40) == pytest.approx(1.0)
    constant = MHIMMiner(mask_ratio_h=0.02, mask_h_schedule="constant", momentum=0.99)
    assert constant.mask_ratio_h_at(30, 40) == 0.02
    assert constant.momentum_at(30, 40) == 0.99


# --------------------------------------------------------------------- teacher
def abmil(seed=0, dropout=0.0, dim=8):
    torch.manual_seed(seed)
    return ABMIL(dim, 2, embed_dim=16, attn_dim=8, dropout=dropout)


def context(head, steps=4):
    return FitContext(
        head=head, device=CPU, epochs=1, steps_per_epoch=steps, generator=gen(0)
    )


def test_teacher_gets_no_gradient_and_moves_by_ema():
    head = abmil()
    miner = MHIMMiner(momentum=0.9, mask_ratio_h=0.2, consistency_weight=1.0)
    ctx = context(head)
    miner.on_fit_start(ctx)
    teacher = miner.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    # The loop's optimiser takes only trainable miner parameters: none here.
    assert [p for m in miner.modules().values() for p in m.parameters()] and not [
        p for m in miner.modules().values() for p in m.parameters() if p.requires_grad
    ]
    x, y = torch.randn(10, 8), torch.tensor([1])
    out, extra = miner.forward(ctx, x, y, 0)
    assert set(extra) == {"consistency"} and extra["consistency"].requires_grad
    (head.loss(out, y) + sum(extra.values())).backward()
    assert all(p.grad is None for p in teacher.parameters())
    before = [p.detach().clone() for p in teacher.parameters()]
    torch.optim.SGD(head.parameters(), lr=0.5).step()
    miner.after_step(ctx, 0)
    moved = False
    for t, t0, s in zip(teacher.parameters(), before, head.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s.detach(), atol=1e-7, rtol=0)
        moved |= not torch.equal(t, t0)
    assert moved
    # Cosine momentum: at step 2 of 4, m = 1 - 0.1 * (1 + cos(pi / 2)) / 2 = 0.95.
    miner = MHIMMiner(momentum=0.9, momentum_schedule="cosine")
    miner.on_fit_start(ctx)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in miner.teacher.parameters()]
    miner.after_step(ctx, 2)
    for t, t0, s in zip(
        miner.teacher.parameters(), before, head.parameters(), strict=True
    ):
        assert torch.allclose(t, 0.95 * t0 + 0.05 * s.detach(), atol=1e-6, rtol=0)


def test_student_sees_kept_instances_in_ascending_order():
    head = abmil()
    miner = MHIMMiner(
        mask_ratio_h=0.2, mask_ratio_hr=1.0, mask_ratio_l=0.2, mask_ratio_r=0.3
    )
    ctx = context(head)
    miner.on_fit_start(ctx)
    seen = {}
    forward = head.forward

    def spy(x, **kw):
        seen.update(kw)
        return forward(x, **kw)

    head.forward = spy
    x = torch.randn(20, 8)
    with torch.no_grad():
        t_scores = miner.teacher(x).attention[0]
    out, _ = miner.forward(ctx, x, torch.tensor([0]), 0)
    keep = seen["keep_idx"].tolist()
    assert keep == sorted(set(keep)) and out.instance_embeddings.shape[0] == len(keep)
    top = set(torch.topk(t_scores, 4).indices.tolist())
    bottom = set(torch.topk(t_scores, 4, largest=False).indices.tolist())
    assert not (set(keep) & (top | bottom))
    stats = miner.last_stats
    assert (stats["n_high"], stats["n_low"], stats["n_random"]) == (4, 4, 6)
    assert stats["n_kept"] == len(keep) >= 20 - 14


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_mode(mode):
    head = abmil(dropout=0.5)
    miner = MHIMMiner(teacher_mode=mode)
    ctx = context(head)
    miner.on_fit_start(ctx)
    x = torch.randn(30, 8)
    miner.forward(ctx, x, torch.tensor([1]), 0)
    assert miner.teacher.training is (mode == "train")
    with torch.no_grad():
        a = miner.teacher(x).bag_embedding
        b = miner.teacher(x).bag_embedding
    assert torch.equal(a, b) is (mode == "eval")


def test_teacher_init_from_checkpoint(tmp_path):
    baseline = abmil(seed=1)
    best = tmp_path / "best.pt"
    save_checkpoint({"head": "abmil", "state_dict": baseline.state_dict()}, best)
    raw = tmp_path / "raw.pt"
    torch.save(baseline.state_dict(), raw)
    for path in (best, raw):
        student = abmil(seed=2)
        attention_before = student.attention.V.weight.detach().clone()
        miner = MHIMMiner(teacher_init=str(path))  # student_init="embed" default
        miner.on_fit_start(context(student))
        expected = baseline.state_dict()
        for name, t in miner.teacher.state_dict().items():
            assert torch.equal(t, expected[name]), name
        assert torch.equal(student.embed[0].weight, baseline.embed[0].weight)
        assert torch.equal(student.attention.V.weight, attention_before)
    student = abmil(seed=2)
    miner = MHIMMiner(teacher_init=str(best), student_init="none")
    miner.on_fit_start(context(student))
    assert not torch.equal(student.embed[0].weight, baseline.embed[0].weight)
    with pytest.raises(ConfigError, match=r"miner\.options\.teacher_init.*not found"):
        MHIMMiner(teacher_init=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match=r"miner\.options\.teacher_init.*fit"):
        MHIMMiner(teacher_init=str(best)).on_fit_start(context(abmil(dim=6)))


# ---------------------------------------------------------------------- GRN
def test_recycle_tokens_get_gradient_queries_follow_ema():
    torch.manual_seed(0)
    grn = GlobalRecycleNetwork(16, 3, n_heads=4, dropout=0.0, momentum=0.9)
    g0 = grn.queries.detach().clone()
    z = grn(torch.randn(7, 16))
    assert z.shape == (3, 16) and z.requires_grad
    (z**2).sum().backward()
    assert grn.queries.grad is None and torch.equal(grn.queries, g0)
    assert grn.to_q.weight.grad is not None and grn.norm.weight.grad is not None
    grn.update_queries(z)
    assert torch.allclose(grn.queries, 0.9 * g0 + 0.1 * z.detach(), atol=1e-7)


def test_recycle_in_miner_appends_tokens():
    head = abmil(dropout=0.25)
    miner = MHIMMiner(
        preset="v2", embed_dim=16, recycle_heads=4, recycle_tokens=3, recycle_ratio=0.5
    )
    assert miner.grn is None  # built in on_fit_start, before the optimiser
    ctx = context(head)
    miner.on_fit_start(ctx)
    trainable = [
        p for m in miner.modules().values() for p in m.parameters() if p.requires_grad
    ]
    assert trainable and not miner.grn.queries.requires_grad
    g0 = miner.grn.queries.detach().clone()
    x, y = torch.randn(40, 8), torch.tensor([1])
    out, extra = miner.forward(ctx, x, y, 0)
    stats = miner.last_stats
    # 40 - ceil(0.03 * 40) = 38 kept by HAM; 19 stay, 19 are recycled into 3 tokens.
    assert (stats["n_high"], stats["n_kept"], stats["n_recycled"]) == (2, 19, 19)
    assert out.instance_embeddings.shape == (19 + 3, 16)
    (head.loss(out, y) + sum(extra.values())).backward()
    assert miner.grn.to_out.weight.grad is not None
    assert torch.equal(miner.grn.queries, g0)
    z = miner._pending_tokens[0]
    miner.after_step(ctx, 0)
    assert torch.allclose(miner.grn.queries, 0.9999 * g0 + 0.0001 * z, atol=1e-7)
    with pytest.raises(ConfigError, match=r"miner\.options\.embed_dim"):
        MHIMMiner(preset="v2", embed_dim=32).on_fit_start(context(abmil()))
    default = MHIMMiner(preset="v2", recycle_heads=4)
    default.on_fit_start(context(abmil()))
    assert default.grn.dim == 16  # the head's width


# ------------------------------------------------------------------ consistency
def test_consistency_loss_hand_computed():
    # softmax(F_t / 0.1) = [1/4, 3/4]; log_softmax(F_s) = log([1/4, 3/4]).
    ft = torch.tensor([[0.0, 0.1 * math.log(3.0)]])
    fs = torch.tensor([[0.0, math.log(3.0)]])
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert consistency_loss(fs, ft).item() == pytest.approx(entropy, abs=1e-6)
    # Row-wise for [1, C, E]: the second row has a uniform student, -log(1/2).
    ft2 = torch.stack([ft[0], ft[0]]).unsqueeze(0)
    fs2 = torch.stack([fs[0], torch.zeros(2)]).unsqueeze(0)
    value = consistency_loss(fs2, ft2).item()
    assert value == pytest.approx((entropy + math.log(2.0)) / 2, abs=1e-6)
    # Temperatures: tau_s = 2 halves the student logits.
    value = consistency_loss(2 * fs, ft, tau_t=0.1, tau_s=2.0).item()
    assert value == pytest.approx(entropy, abs=1e-6)


# ----------------------------------------------------------------- options
def test_presets_and_option_errors():
    miner = MHIMMiner(preset="c16_transmil", mask_ratio_l=0.5)
    assert miner.mask_ratio_l == 0.5  # explicit beats preset
    assert miner.mask_ratio_h == 0.03 and miner.mask_ratio_hr == 0.5
    assert miner.momentum_schedule == "cosine" and miner.head_fusion == "vote"
    assert set(PRESETS) >= {
        "c16_abmil",
        "c16_transmil",
        "c16_dsmil",
        "tcga_abmil",
        "tcga_transmil",
        "tcga_dsmil",
        "v2",
    }
    miner = get_registry("miner").create(
        "mhim", key="miner.options", preset="tcga_abmil"
    )
    assert (miner.mask_ratio_r, miner.mask_ratio_l, miner.consistency_weight) == (
        0.7,
        0.2,
        0.5,
    )
    for kwargs, key in [
        ({"preset": "c17"}, "preset"),
        ({"mask_ratio_h": 1.5}, "mask_ratio_h"),
        ({"mask_ratio_hr": 0.0}, "mask_ratio_hr"),
        ({"momentum_schedule": "linear"}, "momentum_schedule"),
        ({"teacher_mode": "dropout"}, "teacher_mode"),
        ({"score": "magic"}, "score"),
        ({"recycle_tokens": 0}, "recycle_tokens"),
        ({"recycle": "yes"}, "recycle"),
        ({"tau_t": 0}, "tau_t"),
    ]:
        with pytest.raises(ConfigError, match=rf"miner\.options\.{key}\b"):
            MHIMMiner(**kwargs)
    with pytest.raises(ConfigError, match=r"Unknown option miner\.options\.ratio"):
        get_registry("miner").create("mhim", key="miner.options", ratio=0.1)


def test_score_resolution_per_head():
    cases = [
        (abmil(), "auto", "attention"),
        (DSMIL(8, 2, embed_dim=16, query_dim=8), "auto", "instance_logit"),
        (MeanPoolingMIL(8, 2, embed_dim=16), "auto", "class_aware"),
        (abmil(), "class_aware", "class_aware"),
    ]
    x = torch.randn(12, 8)
    by_hand = {
        "attention": lambda t, o: o.attention.float().mean(0),
        "instance_logit": lambda t, o: o.instance_logits.float().max(-1).values,
        "class_aware": lambda t, o: torch.softmax(t._instance_logits(o), -1).amax(-1),
    }
    for head, score, resolved in cases:
        # only the top quarter is masked: the student sees the other 9 instances
        miner = MHIMMiner(
            score=score,
            mask_ratio_h=0.25,
            mask_ratio_hr=1.0,
            mask_ratio_l=0.0,
            mask_ratio_r=0.0,
        )
        miner.on_fit_start(context(head))
        assert miner._resolved_score == resolved
        with torch.no_grad():
            scores = by_hand[resolved](miner.teacher, miner.teacher(x))
        top = set(torch.topk(scores, 3).indices.tolist())
        seen = {}
        forward = head.forward

        def spy(v, forward=forward, seen=seen, **kw):
            seen.update(kw)
            return forward(v, **kw)

        head.forward = spy
        out, _ = miner.forward(context(head), x, torch.tensor([1]), 0)
        assert out.bag_logits.shape == (1, 2)
        assert seen["keep_idx"].tolist() == sorted(set(range(12)) - top), resolved
    with pytest.raises(ConfigError, match=r"miner\.options\.score"):
        MHIMMiner(score="attention").on_fit_start(
            context(MeanPoolingMIL(8, 2, embed_dim=16))
        )


# ------------------------------------------------------------------ loop
def cfg(**kw):
    base = {
        "epochs": 3,
        "lr": 5e-3,
        "weight_decay": 0.0,
        "patience": 100,
        "progress": False,
    }
    base.update(kw)
    return TrainConfig(**base)


HEADS = {
    "abmil": lambda: ABMIL(8, 2, embed_dim=16, attn_dim=8),
    "transmil": lambda: TransMIL(8, 2, embed_dim=16, n_heads=2, num_landmarks=4),
    "dsmil": lambda: DSMIL(8, 2, embed_dim=16, query_dim=8),
}


def make_head(name, seed=0):
    torch.manual_seed(seed)
    return HEADS[name]()


@pytest.mark.parametrize(
    ("head_name", "options"),
    [
        ("abmil", {"preset": "c16_abmil"}),
        ("transmil", {"preset": "c16_transmil"}),
        ("dsmil", {"preset": "tcga_dsmil"}),
        ("transmil", {"preset": "v2", "embed_dim": 16, "recycle_heads": 2}),
    ],
)
def test_fit_runs_and_is_deterministic(head_name, options):
    bags = make_bags(12)
    runs = []
    for _ in range(2):
        miner = MHIMMiner(**options)
        res = fit(make_head(head_name), bags[:8], bags[8:], cfg(), miner=miner, seed=3)
        runs.append((res, miner))
    (a, ma), (b, mb) = runs
    assert len(a.history) == 3 and a.history == b.history
    assert all(math.isfinite(r["train_loss"]) for r in a.history)
    for k in a.best_state:
        assert torch.equal(a.best_state[k], b.best_state[k])
    for k, v in ma.teacher.state_dict().items():
        assert torch.equal(v, mb.teacher.state_dict()[k])
    assert not any(p.requires_grad for p in ma.teacher.parameters())


def test_resume_matches_uninterrupted(tmp_path):
    bags = make_bags(12)
    options = {
        "preset": "v2",
        "embed_dim": 16,
        "recycle_heads": 4,
        "mask_ratio_r": 0.3,
        "teacher_mode": "train",
        "momentum": 0.9,
    }
    full_miner = MHIMMiner(**options)
    full = fit(
        make_head("abmil"),
        bags[:8],
        bags[8:],
        cfg(epochs=4),
        miner=full_miner,
        seed=1,
        checkpoint_dir=tmp_path / "full",
    )

    class Interrupt(Exception):
        pass

    def stop_at_2(row):
        if row["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(
            make_head("abmil"),
            bags[:8],
            bags[8:],
            cfg(epochs=4),
            miner=MHIMMiner(**options),
            seed=1,
            checkpoint_dir=tmp_path / "cut",
            on_epoch_end=stop_at_2,
        )
    resumed_miner = MHIMMiner(**options)
    resumed = fit(
        make_head("abmil", seed=99),
        bags[:8],
        bags[8:],
        cfg(epochs=4),
        miner=resumed_miner,
        seed=1,
        checkpoint_dir=tmp_path / "cut",
    )
    assert resumed.history == full.history
    for k in full.best_state:
        assert torch.equal(resumed.best_state[k], full.best_state[k])
    for name in ("teacher", "recycle"):
        a = full_miner.modules()[name].state_dict()
        b = resumed_miner.modules()[name].state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


# ------------------------------------------------------------------- CLI
def test_cli_train_with_mhim_preset_and_teacher_init(tmp_path):
    runner = CliRunner()
    csv = tmp_path / "bags.csv"
    write_mil_csv(csv, make_bags(16))
    common = [
        "train",
        "--mil-csv",
        str(csv),
        "--head",
        "abmil",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--set",
        "head.options.embed_dim=16",
    ]
    base = tmp_path / "base"
    res = runner.invoke(cli, [*common, "--output-path", str(base)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "mhim"
    # Each fold's teacher starts from the same fold's baseline (the official protocol).
    best = base / "folds" / "{fold_name}" / "best.pt"
    args = [
        *common,
        "--output-path",
        str(out),
        "--miner",
        "mhim",
        "--set",
        "miner.options.preset=c16_abmil",
        "--set",
        f"miner.options.teacher_init={best}",
    ]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["miner"] == "mhim" and summary["n_folds"] == 2
    config = (out / "config.yaml").read_text()
    assert "{fold_name}" in config  # the placeholder is kept in the saved config
    res = runner.invoke(
        cli,
        [
            *common,
            "--output-path",
            str(tmp_path / "bad"),
            "--miner",
            "mhim",
            "--set",
            "miner.options.mask_ratio_h=2",
        ],
    )
    assert res.exit_code == 2 and "miner.options.mask_ratio_h" in res.output
