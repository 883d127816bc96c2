"""SupCon loss: hand-computed values, pair modes, uncertain-negative masking, plugin."""

from __future__ import annotations

import math

import pytest
import torch

from tiahnm.errors import ConfigError
from tiahnm.heads.base import MILOutput
from tiahnm.losses.supcon import SupConLoss, supcon_loss
from tiahnm.plugins import get_registry

E = math.e


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def reference(views, labels, bag_labels, mode, mask_unc, temp, base):
    """Straight loops over the rules of algorithms.md sec. 1.5."""
    n, v, _ = views.shape
    z = torch.nn.functional.normalize(views.double(), dim=-1)
    z = torch.cat([z[:, i] for i in range(v)])
    y = labels.repeat(v).tolist()
    yb = bag_labels.repeat(v).tolist()
    total = 0.0
    for i in range(n * v):
        den = [
            a
            for a in range(n * v)
            if a != i and not (mask_unc and yb[a] == 1 and y[a] == 0)
        ]
        pos = [p for p in den if y[p] == y[i]]
        if (mode == "neg" and y[i] == 1) or (mode == "pos" and y[i] == 0):
            pos = []
        if not pos:
            continue
        lse = math.log(sum(math.exp(float(z[i] @ z[a]) / temp) for a in den))
        total += (
            -(temp / base)
            * sum(float(z[i] @ z[p]) / temp - lse for p in pos)
            / len(pos)
        )
    return total / (n * v)


def test_hand_computed_one_view():
    z = t([1, 0], [1, 0], [0, 1])
    y = torch.tensor([0, 0, 1])
    expected = 2 * (math.log(E + 1) - 1) / 3
    for mode in ("all", "neg"):
        value = supcon_loss(z, y, pair_mode=mode, temperature=1, base_temperature=1)
        assert value.item() == pytest.approx(expected, rel=1e-6)
    # one pseudo-positive: no positive pair under "pos"
    assert (
        supcon_loss(z, y, pair_mode="pos", temperature=1, base_temperature=1).item()
        == 0.0
    )


def test_hand_computed_two_views_and_pair_modes():
    views = torch.stack([t([1, 0], [0, 1]), t([1, 0], [0, 1])], dim=1)  # [2, 2, 2]
    y = torch.tensor([0, 1])
    kw = {"temperature": 1.0, "base_temperature": 1.0}
    full = math.log(E + 2) - 1
    assert supcon_loss(views, y, **kw).item() == pytest.approx(full, rel=1e-6)
    # only the two label-0 anchors have positives; the mean still counts all four
    assert supcon_loss(views, y, pair_mode="neg", **kw).item() == pytest.approx(
        full / 2, rel=1e-6
    )
    assert supcon_loss(views, y, pair_mode="pos", **kw).item() == pytest.approx(
        full / 2, rel=1e-6
    )


def test_temperature_scaling_hand_computed():
    z = t([1, 0], [1, 0], [0, 1])
    y = torch.tensor([0, 0, 1])
    value = supcon_loss(z, y, temperature=0.5, base_temperature=1.0)
    anchor = -0.5 * (2 - math.log(E**2 + 1))
    assert value.item() == pytest.approx(2 * anchor / 3, rel=1e-6)


def test_mask_uncertain_negatives_hand_computed():
    z = t([1, 0], [1, 0], [0, 1])
    y = torch.tensor([0, 0, 0])
    bags = torch.tensor([0, 1, 0])  # sample 1: pseudo-negative in a positive bag
    kw = {"temperature": 1.0, "base_temperature": 1.0, "bag_labels": bags}
    plain = supcon_loss(z, y, **kw).item()
    masked = supcon_loss(z, y, mask_uncertain_neg=True, **kw).item()
    # anchors 0 and 1: positives {1, 0} and {2} over denominators e + 1
    anchor01 = math.log(E + 1) - 0.5
    anchor2 = math.log(2)  # both dot products 0: log-probabilities -log 2
    assert plain == pytest.approx((2 * anchor01 + anchor2) / 3, rel=1e-6)
    assert masked == pytest.approx((math.log(E + 1) - 0.5) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="bag_labels"):
        supcon_loss(z, y, mask_uncertain_neg=True)


@pytest.mark.parametrize("mode", ["all", "neg", "pos"])
@pytest.mark.parametrize("mask", [False, True])
def test_matches_loop_reference(mode, mask):
    g = torch.Generator().manual_seed(3)
    views = torch.randn(7, 2, 5, generator=g)
    y = torch.tensor([0, 1, 0, 0, 1, 1, 0])
    bags = torch.tensor([0, 1, 1, 0, 1, 1, 1])
    got = supcon_loss(
        views,
        y,
        bag_labels=bags,
        pair_mode=mode,
        mask_uncertain_neg=mask,
        temperature=0.07,
        base_temperature=0.07,
    )
    want = reference(views, y, bags, mode, mask, 0.07, 0.07)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_stable_gradients_at_low_temperature_and_empty_denominators():
    z = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(0))
    z.requires_grad_()
    loss = supcon_loss(z * 50, torch.tensor([0, 0, 1, 1, 0, 1]), temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # a lone sample (one view) has no denominator: loss 0, finite gradient
    one = torch.ones(1, 4, requires_grad=True)
    value = supcon_loss(one, torch.tensor([0]))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(one.grad).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="pair_mode"):
        supcon_loss(torch.ones(2, 3), torch.tensor([0, 1]), pair_mode="x")
    with pytest.raises(ValueError, match="len\\(labels\\)"):
        supcon_loss(torch.ones(3, 3), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="pair_mode"):
        SupConLoss(pair_mode="both")
    with pytest.raises(ConfigError, match="temperature"):
        SupConLoss(temperature=0)


def _out(vec):
    return MILOutput(
        bag_logits=torch.zeros(1, 2),
        bag_embedding=torch.tensor([vec], dtype=torch.float32),
        instance_embeddings=torch.zeros(1, 2),
    )


def test_plugin_on_bag_embeddings():
    loss = get_registry("loss").create("supcon", temperature=1.0, base_temperature=1.0)
    assert isinstance(loss, SupConLoss)
    assert loss(None, [_out([1, 0])], [1]) is None
    value = loss(None, [_out([1, 0]), _out([1, 0]), _out([0, 1])], [0, 0, 1])
    assert value.item() == pytest.approx(2 * (math.log(E + 1) - 1) / 3, rel=1e-6)
