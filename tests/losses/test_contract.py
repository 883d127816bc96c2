"""Contract tests run on every registered loss (built-in or plugin).

A :class:`tiahnm.losses.BatchLoss` is called as ``loss(head, outputs, labels)`` with the
head outputs of one optimiser step. Every registered loss must: be buildable with its
defaults, reject unknown options by name, return a finite scalar (or ``None`` when it
does not apply) for batches of every heads' outputs, send finite gradients to the head,
be deterministic, not depend on the order of the batch when it pairs all bags, and be
zero-or-``None`` for a batch of one bag (nothing to compare it with).
"""

from __future__ import annotations

import pytest
import torch

from tiahnm.errors import ConfigError
from tiahnm.heads.base import MILHead
from tiahnm.losses.base import BatchLoss
from tiahnm.plugins import get_registry
from tiahnm.utils.options import defaults, parse

IN_DIM = 12
LOSS_NAMES = sorted(get_registry("loss"))
# Heads the losses are checked against: one attention head without an instance
# classifier and one with (the losses pick their instance score from the head).
HEADS = ("abmil", "dsmil")
# Options a loss needs to work with a head that lacks its default score kind.
LOSS_OPTIONS: dict[tuple[str, str], dict] = {
    ("mirank", "abmil"): {"score": "class_aware"},
}


def make_head(name: str, seed: int = 0) -> MILHead:
    torch.manual_seed(seed)
    return get_registry("head").create(name, IN_DIM, 2, embed_dim=16)


def make_loss(name: str, head_name: str) -> BatchLoss:
    return get_registry("loss").create(name, **LOSS_OPTIONS.get((name, head_name), {}))


def batch(head: MILHead, labels=(1, 0, 1, 0), seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for i, y in enumerate(labels):
        x = torch.randn(5 + 2 * i, IN_DIM, generator=gen) + 1.5 * y
        outs.append(head(x, label=torch.tensor([y])))
    return outs, list(labels)


def test_builtin_losses_registered():
    assert {"mirank", "supcon"} <= set(LOSS_NAMES)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_is_a_batch_loss_and_rejects_unknown_options(name):
    assert isinstance(get_registry("loss").create(name), BatchLoss)
    with pytest.raises(ConfigError, match=r"losses\[x\]\.no_such_option"):
        get_registry("loss").create(name, key="losses[x]", no_such_option=1)


#: Losses with a declared options class (the others are checked by signature).
DECLARED = [n for n in LOSS_NAMES if get_registry("loss")[n].options is not None]


def test_builtin_losses_declare_options():
    assert {"mirank", "supcon"} <= set(DECLARED)


@pytest.mark.parametrize("name", DECLARED)
def test_declared_options_defaults_parse_and_build(name):
    """A loss with an options class: its defaults parse and give the same loss."""
    entry = get_registry("loss")[name]
    given = defaults(entry.options)
    assert parse(entry.options, given, key="losses[0].options") == entry.options()
    explicit = get_registry("loss").create(name, **given)
    assert vars(explicit) == vars(get_registry("loss").create(name))


@pytest.mark.parametrize("head_name", HEADS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_finite_scalar_with_gradient_to_the_head(name, head_name):
    head = make_head(head_name)
    head.train()
    outs, labels = batch(head)
    value = make_loss(name, head_name)(head, outs, labels)
    assert value is not None, "a batch with both classes must give a loss"
    assert value.dim() == 0
    assert torch.isfinite(value)
    value.backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads, "no gradient reached the head"
    assert all(torch.isfinite(g).all() for g in grads)
    if value.item() > 0:
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("head_name", HEADS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_deterministic(name, head_name):
    values = []
    for _ in range(2):
        head = make_head(head_name).eval()
        outs, labels = batch(head)
        values.append(make_loss(name, head_name)(head, outs, labels))
    assert torch.equal(values[0], values[1])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_single_bag_batch_is_none_or_zero(name):
    head = make_head("dsmil").eval()
    outs, labels = batch(head, labels=(1,))
    value = make_loss(name, "dsmil")(head, outs, labels)
    assert value is None or value.item() == 0.0


def test_mirank_all_pairs_is_order_invariant_and_equals_hand_computation():
    head = make_head("dsmil").eval()
    outs, labels = batch(head)
    loss = make_loss("mirank", "dsmil")
    forward = loss(head, outs, labels)
    backward = loss(head, outs[::-1], labels[::-1])
    torch.testing.assert_close(forward, backward)
    scores = [head.instance_scores(o, "instance_logit") for o in outs]
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    hand = [
        max(
            0.0,
            1.0
            - p.topk(min(10, p.numel())).values.mean().item()
            + n.topk(min(10, n.numel())).values.mean().item(),
        )
        for p in pos
        for n in neg
    ]
    assert forward.item() == pytest.approx(sum(hand) / len(hand), rel=1e-6)
