"""MHIM teacher start: warm-up without teacher_init, teacher_init on every head."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.synthetic import make_bags
from tiahnm.config import TrainConfig
from tiahnm.errors import ConfigError
from tiahnm.heads.abmil import ABMIL
from tiahnm.heads.end_to_end import EncoderMIL
from tiahnm.miners.base import FitContext
from tiahnm.miners.mhim import MHIMMiner
from tiahnm.runtime.checkpoint import save_checkpoint
from tiahnm.training.loop import fit

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def abmil(seed=0):
    torch.manual_seed(seed)
    return ABMIL(8, 2, embed_dim=16, attn_dim=8, dropout=0.0)


def encoder_mil(seed=0):
    torch.manual_seed(seed)
    return EncoderMIL(
        64,
        2,
        encoder_options={"out_dim": 16, "width": 4},
        head_options={"embed_dim": 16, "attn_dim": 8, "dropout": 0.0},
    )


def context(head, epochs):
    return FitContext(
        head=head,
        device=CPU,
        epochs=epochs,
        steps_per_epoch=2,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(("epochs", "expected"), [(1, 0), (2, 1), (10, 2), (100, 20)])
def test_default_warmup_is_a_fifth_of_the_epochs(epochs, expected):
    assert MHIMMiner().warmup_epochs(epochs) == expected
    assert MHIMMiner(teacher_warmup=3).warmup_epochs(epochs) == min(3, epochs)


def test_warmup_trains_plainly_then_teacher_starts_from_student(caplog):
    head = abmil()
    miner = MHIMMiner(mask_ratio_h=0.2, mask_ratio_r=0.5, momentum=0.5)
    ctx = context(head, epochs=10)
    with caplog.at_level(logging.INFO, logger="tiahnm"):
        miner.on_fit_start(ctx)
    assert "2 epoch(s) of plain training" in caplog.text
    x, y = torch.randn(20, 8), torch.tensor([1])
    teacher0 = [p.detach().clone() for p in miner.teacher.parameters()]
    miner.on_epoch_start(ctx, 0)
    out, extra = miner.forward(ctx, x, y, 0)
    assert out.instance_embeddings.shape[0] == 20 and extra == {}  # no masking
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.5)
    miner.after_step(ctx, 0)  # no EMA during the warm-up
    for t, t0 in zip(miner.teacher.parameters(), teacher0, strict=True):
        assert torch.equal(t, t0)
    miner.on_epoch_start(ctx, 1)
    assert miner.state_dict()["teacher_ready"] is False
    with caplog.at_level(logging.INFO, logger="tiahnm"):
        miner.on_epoch_start(ctx, 2)
    assert "warm-up done after 2 epoch(s)" in caplog.text
    for t, s in zip(miner.teacher.parameters(), head.parameters(), strict=True):
        assert torch.equal(t, s.detach())  # the teacher is the warmed-up student
    out, extra = miner.forward(ctx, x, y, 4)
    assert out.instance_embeddings.shape[0] < 20 and set(extra) == {"consistency"}
    # a restored miner knows the warm-up is over
    again = MHIMMiner(mask_ratio_h=0.2, momentum=0.5)
    again.on_fit_start(context(abmil(), epochs=10))
    again.load_state_dict(miner.state_dict())
    assert again.state_dict()["teacher_ready"] is True


def test_no_warmup_warns_and_teacher_init_excludes_warmup(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tiahnm"):
        MHIMMiner(teacher_warmup=0).on_fit_start(context(abmil(), epochs=10))
    assert "teacher starts as a copy of the untrained student" in caplog.text
    best = tmp_path / "best.pt"
    save_checkpoint({"state_dict": abmil(1).state_dict()}, best)
    assert MHIMMiner(teacher_init=str(best)).warmup_epochs(100) == 0
    with pytest.raises(
        ConfigError, match=r"teacher_warmup must be 0 with teacher_init"
    ):
        MHIMMiner(teacher_init=str(best), teacher_warmup=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=r"teacher_warmup: expected an integer"):
            MHIMMiner(teacher_warmup=bad)


def test_teacher_init_and_student_init_on_encoder_mil(tmp_path):
    baseline = encoder_mil(seed=1)
    best = tmp_path / "best.pt"
    save_checkpoint({"state_dict": baseline.state_dict()}, best)
    student = encoder_mil(seed=2)
    attention_before = student.head.attention.V.weight.detach().clone()
    miner = MHIMMiner(teacher_init=str(best))  # student_init: embed
    miner.on_fit_start(context(student, epochs=3))
    for name, t in miner.teacher.state_dict().items():
        assert torch.equal(t, baseline.state_dict()[name]), name
    # "embed" for an encoder head: the encoder and the inner projection
    for a, b in zip(
        student.encoder.parameters(), baseline.encoder.parameters(), strict=True
    ):
        assert torch.equal(a, b)
    assert torch.equal(student.head.embed[0].weight, baseline.head.embed[0].weight)
    assert torch.equal(student.head.attention.V.weight, attention_before)
    student = encoder_mil(seed=2)
    MHIMMiner(teacher_init=str(best), student_init="all").on_fit_start(
        context(student, epochs=3)
    )
    for name, t in student.state_dict().items():
        assert torch.equal(t, baseline.state_dict()[name]), name


def test_fit_with_encoder_mil_and_teacher_init(tmp_path):
    bags = make_bags(8, dim=64, min_n=3, max_n=5)
    best = tmp_path / "best.pt"
    save_checkpoint({"state_dict": encoder_mil(seed=1).state_dict()}, best)
    cfg = TrainConfig(epochs=2, lr=1e-3, progress=False, patience=10)
    start = encoder_mil(seed=1).state_dict()

    class Recording(MHIMMiner):
        """Keeps the student's parameters each time the teacher takes an EMA step."""

        students: list[dict[str, torch.Tensor]] = []

        def after_step(self, ctx, step):
            params = ctx.head.named_parameters()
            self.students.append({k: v.detach().clone() for k, v in params})
            super().after_step(ctx, step)

    miner = Recording(teacher_init=str(best), mask_ratio_h=0.2, momentum=0.9)
    res = fit(encoder_mil(), bags[:6], bags[6:], cfg, miner=miner, seed=0)
    assert len(res.history) == 2 and miner.last_stats["n_kept"] < miner.last_stats["n"]
    # the teacher starts from teacher_init (no warm-up) and takes one EMA step of
    # momentum 0.9 towards the student after each of the 2 x 6 optimiser steps
    assert len(miner.students) == 12
    for name, t in miner.teacher.named_parameters():
        want = start[name].clone()
        for student in miner.students:
            want = 0.9 * want + 0.1 * student[name]
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6, msg=name)
