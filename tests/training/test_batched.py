"""Steps of several bags (train.batch_size), padded batches and torch.compile."""

import copy

import pytest
import torch

from tests.synthetic import make_bags
from tiahnm.config import TrainConfig
from tiahnm.errors import ConfigError
from tiahnm.heads.abmil import ABMIL
from tiahnm.miners.base import Miner
from tiahnm.miners.mhim import MHIMMiner
from tiahnm.plugins import get_registry
from tiahnm.training.loop import _can_pad, compile_head, fit, group_steps


def cfg(**kw):
    base = {
        "epochs": 3,
        "lr": 5e-3,
        "weight_decay": 0.0,
        "patience": 100,
        "progress": False,
        "scheduler": "none",
    }
    base.update(kw)
    return TrainConfig(**base)


def head(name="abmil", seed=0, **options):
    torch.manual_seed(seed)
    return get_registry("head").create(name, 8, 2, embed_dim=16, dropout=0.0, **options)


def test_group_steps_keeps_order_and_a_short_last_step():
    batches = [[i] for i in range(5)]
    assert group_steps(batches, 2) == [[[0], [1]], [[2], [3]], [[4]]]
    assert group_steps(batches, 1) == [[[i]] for i in range(5)]


def test_a_step_of_several_bags_follows_the_mean_gradient():
    bags = make_bags(4)
    h = head()
    start = copy.deepcopy(h)
    # by hand: one SGD step on the mean loss of the 4 bags
    loss = torch.stack(
        [start.loss(start(b.features), torch.tensor([b.label])) for b in bags]
    ).mean()
    loss.backward()
    expected = {n: p - 0.1 * p.grad for n, p in start.named_parameters()}
    res = fit(
        h, bags, [], cfg(epochs=1, optimizer="sgd", momentum=0.0, lr=0.1, batch_size=4)
    )
    assert res.history[0]["train_loss"] == pytest.approx(loss.item(), abs=1e-6)
    for name, p in h.named_parameters():
        torch.testing.assert_close(
            p.detach(), expected[name].detach(), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("name", ["abmil", "abmil_gated", "mean_pool", "max_pool"])
def test_padded_batches_train_like_one_bag_at_a_time(name):
    bags = make_bags(14, min_n=3, max_n=15)
    train, val = bags[:10], bags[10:]
    # SGD: Adam would turn the float noise of the attention bias's gradient (exactly
    # zero in theory, softmax is shift invariant) into full-size steps
    opts = {"optimizer": "sgd", "lr": 0.05, "batch_size": 3}
    a = fit(head(name), train, val, cfg(**opts), seed=2)
    b = fit(head(name), train, val, cfg(**opts, pad_batches=True), seed=2)
    assert len(a.history) == len(b.history) == 3
    for ra, rb in zip(a.history, b.history, strict=True):
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), key
    for key in a.best_state:
        torch.testing.assert_close(
            a.best_state[key], b.best_state[key], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("name", ["abmil", "mean_pool", "max_pool"])
def test_forward_padded_equals_per_bag_forward(name):
    h = head(name).eval()
    bags = make_bags(3, min_n=2, max_n=9)
    xs = [b.features for b in bags]
    x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
    x[0, xs[0].shape[0] :] = 1e3  # padding content must not matter
    mask = torch.arange(x.shape[1])[None] < torch.tensor([len(v) for v in xs])[:, None]
    with torch.no_grad():
        padded = h.forward_padded(x, mask)
        single = torch.cat([h(v).bag_logits for v in xs])
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=0)


def test_padding_is_used_only_where_it_gives_the_same_training():
    assert _can_pad(head(), Miner(), [])
    assert not _can_pad(head(), MHIMMiner(), [])
    assert not _can_pad(head(), Miner(), [(object(), 1.0)])
    assert not head(adaptive_lambda=2.0).supports_padding()
    assert not _can_pad(head("dsmil"), Miner(), [])  # no padded forward
    # with a miner the loop falls back to per-bag forwards: identical results
    bags = make_bags(8)
    kw = {"mask_ratio_h": 0.2, "mask_ratio_hr": 1.0, "mask_ratio_r": 0.0}
    a = fit(head(), bags, [], cfg(batch_size=2), miner=MHIMMiner(**kw), seed=1)
    b = fit(
        head(),
        bags,
        [],
        cfg(batch_size=2, pad_batches=True),
        miner=MHIMMiner(**kw),
        seed=1,
    )
    assert a.history == b.history


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", 0, "train.batch_size must be >= 1, got 0."),
        ("loader_workers", 0, "train.loader_workers must be >= 1, got 0."),
        ("prefetch", -1, "train.prefetch must be >= 0, got -1."),
    ],
)
def test_bad_loop_settings_are_config_errors(key, value, message):
    with pytest.raises(ConfigError) as err:
        fit(head(), make_bags(2), [], cfg(**{key: value}))
    assert str(err.value) == message


def test_compiled_head_takes_new_bag_sizes_without_recompiling():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    h = ABMIL(8, 2, embed_dim=16, attn_dim=8, dropout=0.0)
    eager = copy.deepcopy(h)
    keys = list(h.state_dict())
    compile_head(h, backend="eager")
    for n in (5, 9, 13, 40):
        x = torch.randn(n, 8)
        out = h(x)
        out.bag_logits.sum().backward()
        torch.testing.assert_close(out.bag_logits, eager(x).bag_logits)
    assert counters["stats"]["unique_graphs"] == 1
    assert list(h.state_dict()) == keys  # checkpoints load without compile
    torch._dynamo.reset()
