import pytest
import torch

from tiahnm.errors import ConfigError
from tiahnm.heads.end_to_end import EncoderMIL


def head(**kw):
    torch.manual_seed(0)
    opts = {
        "encoder_options": {"out_dim": 16, "width": 8},
        "head_options": {"embed_dim": 16, "attn_dim": 8},
    }
    opts.update(kw)
    return EncoderMIL(784, 2, **opts)


def test_gradient_reaches_the_encoder_unless_frozen():
    x, y = torch.rand(5, 784), torch.tensor([1])
    h = head()
    h.train()
    h.loss(h(x), y).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in h.encoder.parameters()
    )
    frozen = head(freeze_encoder=True)
    frozen.loss(frozen(x), y).backward()
    assert all(p.grad is None for p in frozen.encoder.parameters())
    assert frozen.head.classifier.weight.grad is not None


def test_keep_idx_drops_images_before_the_encoder():
    h = head().eval()
    x = torch.rand(6, 784)
    keep = torch.tensor([0, 2, 5])
    with torch.no_grad():
        torch.testing.assert_close(
            h(x, keep_idx=keep).bag_logits, h(x[keep]).bag_logits
        )


def test_shape_errors():
    with pytest.raises(ConfigError, match="not a square"):
        EncoderMIL(785, 2)
    with pytest.raises(ConfigError, match="image_shape"):
        EncoderMIL(784, 2, image_shape=(3, 28, 28))


def test_eval_cache_reuses_features_only_while_nothing_changed():
    h = head()
    h.enable_eval_cache()
    calls = []
    h.encoder.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(6, 784)
    h.eval()
    with torch.inference_mode():
        first = h(x).bag_logits
        again = h(x).bag_logits
    assert len(calls) == 1  # second forward served from the cache
    torch.testing.assert_close(first, again)
    with torch.no_grad():
        x[0] += 1.0  # bag changed in place
        changed = h(x).bag_logits
        assert len(calls) == 2
        next(h.encoder.parameters()).mul_(0.5)  # encoder changed in place
        h(x)
        assert len(calls) == 3
    h(x)  # autograd on: never cached
    assert len(calls) == 4
    h.train()
    with torch.no_grad():
        h(x)  # training mode: never cached
    assert len(calls) == 5
    assert not torch.equal(first, changed)
    uncached = head()
    uncached.eval()
    with torch.no_grad():
        uncached(x)
        uncached(x)
    assert uncached._eval_cache is None


def _inner_input(h, x):
    """The features the inner head receives for bag ``x``."""
    seen = []
    hook = h.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    h(x)
    hook.remove()
    return seen[0].detach()


def test_feature_norm_standardises_encoder_features_over_the_bag():
    x = torch.rand(7, 784)
    h = head().train()
    raw = h.encoder(x.reshape(7, 1, 28, 28)).detach()
    got = _inner_input(h, x)
    # training: each feature standardised over the bag's instances (biased var)
    want = (raw - raw.mean(0)) / torch.sqrt(raw.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # eval: the running statistics (one update of momentum 0.1 from 0 / 1) of the
    # training-mode features, applied to the eval-mode encoder output
    h.eval()
    mean = 0.1 * raw.mean(0)
    var = 0.9 + 0.1 * raw.var(0, unbiased=True)
    raw_eval = h.encoder(x.reshape(7, 1, 28, 28)).detach()
    want = (raw_eval - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(_inner_input(h, x), want, rtol=1e-4, atol=1e-4)


def test_feature_norm_none_passes_raw_features_and_one_instance_bags_train():
    x = torch.rand(4, 784)
    h = head(feature_norm="none").train()
    raw = h.encoder(x.reshape(4, 1, 28, 28)).detach()
    torch.testing.assert_close(_inner_input(h, x), raw)
    single = head().train()  # a one-instance bag: running stats, no error
    one = x[:1]
    raw1 = single.encoder(one.reshape(1, 1, 28, 28)).detach()
    torch.testing.assert_close(
        _inner_input(single, one), raw1 / torch.sqrt(torch.tensor(1 + 1e-5))
    )
    single.loss(single(one), torch.tensor([1])).backward()
    assert single.feature_bn.weight.grad is not None
    with pytest.raises(ConfigError, match="feature_norm"):
        head(feature_norm="layer")


def test_models_saved_before_feature_norm_load_with_none_only():
    old = head(feature_norm="none").state_dict()
    del old["stats_set"]  # the buffers of a model saved before feature_norm
    h = head(feature_norm="none")
    h.load_state_dict(old)
    assert not bool(h.stats_set)  # identity statistics: never set
    old["feature_std"] = torch.full_like(old["feature_std"], 2.0)  # set by hnm
    h.load_state_dict(old)
    assert bool(h.stats_set)
    with pytest.raises(RuntimeError, match="feature_norm: none"):
        head().load_state_dict(old)


def test_runs_the_base_head_init_without_a_shared_embedding(monkeypatch):
    """EncoderMIL goes through MILHead.__init__ (its checks and attributes) but adds
    no in_dim -> embed_dim layer: the encoder and the inner head embed."""
    from tiahnm.heads.base import MILHead

    calls = []
    real = MILHead.__init__

    def spy(self, *args, **kwargs):
        calls.append((type(self).__name__, args, kwargs))
        real(self, *args, **kwargs)

    monkeypatch.setattr(MILHead, "__init__", spy)
    h = head()
    outer = [c for c in calls if c[0] == "EncoderMIL"]
    assert outer == [("EncoderMIL", (784, 2), {"shared_embed": False})]
    assert not hasattr(h, "embed")
    assert not any(k.startswith("embed.") for k in h.state_dict())
    assert (h.in_dim, h.n_classes, h.embed_dim) == (784, 2, h.head.embed_dim)
    with pytest.raises(ConfigError, match="n_classes >= 2"):
        EncoderMIL(784, 1, encoder_options={"out_dim": 8, "width": 4})
