import pytest
import torch

from tiahnm.errors import ConfigError
from tiahnm.heads.dsmil import DSMIL
from tiahnm.losses.ranking import MIRankLoss, mi_rank_loss


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_hand_computed():
    # top-2 pos mean = (1.5 + 1) / 2 = 1.25 ; top-2 neg mean = (1 + 0.5) / 2 = 0.75
    assert mi_rank_loss(t(1.5, -1, 1), t(0, 1, 0.5), k=2).item() == pytest.approx(
        1 - 1.25 + 0.75
    )
    # well separated: hinge at zero
    assert mi_rank_loss(t(5, 4), t(0, -1), k=1).item() == 0.0


def test_k_larger_than_bag_is_clipped():
    assert mi_rank_loss(t(1.0, 0.0), t(0.5), k=10).item() == pytest.approx(
        1 - 0.5 + 0.5
    )


def test_ties_and_all_equal():
    assert mi_rank_loss(t(2, 2, 2), t(2, 2), k=2).item() == pytest.approx(1.0)
    assert mi_rank_loss(t(1, 1, 0), t(0, 0, 0), k=2).item() == pytest.approx(1 - 1 + 0)


def test_margin_and_gradient():
    pos = t(0.2, 0.1).requires_grad_()
    neg = t(0.3, -0.2).requires_grad_()
    loss = mi_rank_loss(pos, neg, k=1, margin=0.5)
    assert loss.item() == pytest.approx(0.5 - 0.2 + 0.3)
    loss.backward()
    assert pos.grad.tolist() == [-1.0, 0.0]
    assert neg.grad.tolist() == [1.0, 0.0]


def test_batch_loss_needs_both_classes_and_uses_head_scores():
    torch.manual_seed(0)
    head = DSMIL(6, 2, embed_dim=8, query_dim=4, dropout=0.0)
    loss = MIRankLoss(k=3)
    xp, xn = torch.randn(5, 6), torch.randn(4, 6)
    op, on = head(xp), head(xn)
    assert loss(head, [op], [1]) is None
    value = loss(head, [op, on], [1, 0])
    expected = mi_rank_loss(op.instance_logits[:, 1], on.instance_logits[:, 1], k=3)
    assert value.item() == pytest.approx(expected.item())
    prob = MIRankLoss(k=3, on="prob")(head, [op, on], [1, 0])
    expected = mi_rank_loss(
        op.instance_logits.softmax(-1)[:, 1], on.instance_logits.softmax(-1)[:, 1], k=3
    )
    assert prob.item() == pytest.approx(expected.item())


def test_bad_options():
    with pytest.raises(ConfigError):
        MIRankLoss(on="rank")
    with pytest.raises(ConfigError):
        MIRankLoss(k=0)
