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


def test_all_equal_scores_large_k_and_probabilities():
    # every score equal: the means cancel, the loss is the margin; K > bag is clipped
    assert mi_rank_loss(t(0.3, 0.3), t(0.3, 0.3, 0.3), k=50).item() == pytest.approx(
        1.0
    )
    # on probabilities the margin can never be met: 1 - 1 + 0 at best
    assert mi_rank_loss(t(1.0, 0.9), t(0.0), k=1, margin=1.0).item() == 0.0
    with pytest.raises(ValueError, match="at least one instance"):
        mi_rank_loss(t(), t(1.0))


def _pair_head():
    torch.manual_seed(0)
    return DSMIL(6, 2, embed_dim=8, query_dim=4, dropout=0.0)


def test_index_pairing_ranks_ith_positive_with_ith_negative():
    head = _pair_head()
    outs = [head(torch.randn(n, 6)) for n in (5, 4, 3, 6, 2)]
    labels = [1, 0, 1, 0, 1]  # positives 0, 2, 4; negatives 1, 3
    s = [o.instance_logits[:, 1] for o in outs]
    want = (mi_rank_loss(s[0], s[1], k=2) + mi_rank_loss(s[2], s[3], k=2)) / 2
    got = MIRankLoss(k=2, pairing="index")(head, outs, labels)
    assert got.item() == pytest.approx(want.item())
    every = [mi_rank_loss(s[p], s[n], k=2) for p in (0, 2, 4) for n in (1, 3)]
    got_all = MIRankLoss(k=2)(head, outs, labels)
    assert got_all.item() == pytest.approx(torch.stack(every).mean().item())
    with pytest.raises(ConfigError, match="pairing"):
        MIRankLoss(pairing="random")


def test_head_without_the_score_kind_is_a_config_error_and_attention_heads_work():
    from tiahnm.heads.abmil import ABMIL

    class AttentionOnly:
        supported_scores = ("attention",)

    with pytest.raises(ConfigError, match=r"losses\[mirank\].*instance_logit"):
        MIRankLoss()(AttentionOnly(), [None, None], [1, 0])
    # AB-MIL has no instance classifier: its instance logits are the CAM
    torch.manual_seed(0)
    head = ABMIL(6, 2, embed_dim=8, attn_dim=4, dropout=0.0)
    outs = [head(torch.randn(4, 6)), head(torch.randn(3, 6))]
    value = MIRankLoss(k=2, on="prob")(head, outs, [1, 0])
    sp = head.instance_scores(outs[0], "instance_prob")
    sn = head.instance_scores(outs[1], "instance_prob")
    assert value.item() == pytest.approx(mi_rank_loss(sp, sn, k=2).item())


def test_encoder_mil_head_gives_inner_dsmil_scores():
    from tiahnm.heads.end_to_end import EncoderMIL

    torch.manual_seed(0)
    head = EncoderMIL(
        64,
        2,
        encoder_options={"out_dim": 8, "width": 4},
        head="dsmil",
        head_options={"embed_dim": 8, "query_dim": 4, "dropout": 0.0},
    )
    op, on = head(torch.rand(5, 64)), head(torch.rand(4, 64))
    value = MIRankLoss(k=3)(head, [op, on], [1, 0])
    want = mi_rank_loss(op.instance_logits[:, 1], on.instance_logits[:, 1], k=3)
    assert value.item() == pytest.approx(want.item())
    value.backward()
    assert head.head.instance_classifier.weight.grad is not None
