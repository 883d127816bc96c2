"""Contract tests run on every registered MIL head, plus head-specific checks.

Every head found in the ``head`` registry (built-in or plugin) must honour the
:class:`tiahnm.heads.MILHead` interface: shapes of the :class:`MILOutput`, instance
scores of every supported kind, gradients to its parameters, determinism,
``keep_idx``, ``extra_tokens``, more than two classes, and bags of 1 and 2000
instances.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tiahnm.heads.base import SCORE_KINDS, MILHead, MILOutput
from tiahnm.plugins import get_registry
from tiahnm.utils.options import defaults, parse

IN_DIM = 24
EMBED_DIM = 32
N_INST = 12

HEAD_NAMES = sorted(get_registry("head"))

# Parameters that may legitimately get no gradient from ``loss(out, y)`` in train
# mode with label y = 1 (name prefixes). CLAM trains only the instance classifier of
# the true class when subtyping is off, so class 0's instance classifier gets none.
NO_GRAD_ALLOWED: dict[str, tuple[str, ...]] = {
    "clam_sb": ("instance_classifiers.0.",),
    "clam_mb": ("instance_classifiers.0.",),
}


# Heads that need options to take IN_DIM-wide rows (the end-to-end head reads them as
# 1 x 4 x 6 images).
HEAD_OPTIONS: dict[str, dict] = {
    "encoder_mil": {
        "image_shape": (1, 4, 6),
        "encoder_options": {"out_dim": 16, "width": 4},
        "head_options": {"embed_dim": EMBED_DIM},
    },
}


def make_head(name: str, n_classes: int = 2, *, seed: int = 0, **options) -> MILHead:
    """Build a registered head with small dimensions (options it does not take are
    left out, so third-party heads get their defaults)."""
    entry = get_registry("head")[name]
    factory = entry.factory
    options = {**HEAD_OPTIONS.get(name, {}), **options}
    accepted = entry.spec(n_args=2).names  # declared options, else the signature
    if "embed_dim" in accepted:
        options.setdefault("embed_dim", EMBED_DIM)
    torch.manual_seed(seed)
    head = factory(IN_DIM, n_classes, **options)
    assert isinstance(head, MILHead)
    return head


def bag(n: int = N_INST, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN_DIM, generator=gen)


def check_output(head: MILHead, out: MILOutput, n: int, n_classes: int) -> None:
    """The shape part of the contract for a bag of ``n`` rows."""
    assert isinstance(out, MILOutput)
    assert out.bag_logits.shape == (1, n_classes)
    assert torch.isfinite(out.bag_logits).all()
    assert out.bag_embedding.shape[0] == 1
    assert out.instance_embeddings.shape[0] == n
    if out.attention is not None:
        assert out.attention.dim() == 2
        assert out.attention.shape[1] == n
        assert (out.attention >= 0).all()
        torch.testing.assert_close(
            out.attention.sum(dim=1), torch.ones(out.attention.shape[0])
        )
    if out.instance_logits is not None:
        assert out.instance_logits.shape == (n, n_classes)
    assert head.default_eval_score in head.supported_scores
    for kind in head.supported_scores:
        assert kind in SCORE_KINDS
        scores = head.instance_scores(out, kind)
        assert scores.shape == (n,), kind
        assert torch.isfinite(scores).all(), kind
    for value in out.aux_losses.values():
        assert value.dim() == 0


def assert_same_output(a: MILOutput, b: MILOutput, *, exact: bool = False) -> None:
    pairs = [
        (a.bag_logits, b.bag_logits),
        (a.bag_embedding, b.bag_embedding),
        (a.instance_embeddings, b.instance_embeddings),
        (a.attention, b.attention),
        (a.instance_logits, b.instance_logits),
    ]
    for x, y in pairs:
        assert (x is None) == (y is None)
        if x is None:
            continue
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- contract


#: Heads with a declared options class (the others are checked by signature).
DECLARED = [n for n in HEAD_NAMES if get_registry("head")[n].options is not None]


def test_builtin_heads_declare_options():
    builtin = {"abmil", "abmil_gated", "clam_sb", "clam_mb", "dsmil", "dtfd"}
    assert builtin | {"transmil", "mean_pool", "max_pool"} <= set(DECLARED)


@pytest.mark.parametrize("name", DECLARED)
def test_declared_options_defaults_parse_and_build(name):
    """A head with an options class: its defaults parse and build the same head."""
    entry = get_registry("head")[name]
    given = defaults(entry.options)
    assert parse(entry.options, given, key="head.options") == entry.options()
    torch.manual_seed(0)
    explicit = get_registry("head").create(name, IN_DIM, 2, **given)
    torch.manual_seed(0)
    implicit = get_registry("head").create(name, IN_DIM, 2)
    assert explicit.embed_dim == implicit.embed_dim == given["embed_dim"]
    a, b = explicit.state_dict(), implicit.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_registry_has_builtin_heads():
    for name in ("abmil", "dsmil", "transmil", "clam_sb", "clam_mb", "dtfd"):
        assert name in HEAD_NAMES


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_output_shapes_and_scores(name):
    head = make_head(name).eval()
    with torch.no_grad():
        out = head(bag())
    check_output(head, out, N_INST, 2)
    assert out.instance_embeddings.shape == (N_INST, EMBED_DIM)
    with pytest.raises(ValueError, match="does not give"):
        head.instance_scores(out, "no_such_kind")


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_batched_input_equals_unbatched(name):
    head = make_head(name).eval()
    x = bag()
    with torch.no_grad():
        assert_same_output(head(x), head(x.unsqueeze(0)))


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_gradients_reach_every_parameter(name):
    head = make_head(name).train()
    y = torch.tensor([1])
    torch.manual_seed(2)
    out = head(bag(), label=y)
    loss = head.loss(out, y)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()
    allowed = NO_GRAD_ALLOWED.get(name, ())
    missing = []
    for pname, param in head.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            if not pname.startswith(allowed):
                missing.append(pname)
            continue
        assert torch.isfinite(param.grad).all(), pname
    assert not missing, f"{name}: no gradient for {missing}"


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_determinism(name):
    a = make_head(name, seed=3)
    b = make_head(name, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    a.eval()
    b.eval()
    x = bag()
    with torch.no_grad():
        first = a(x)
        assert_same_output(first, a(x), exact=True)
        assert_same_output(first, b(x), exact=True)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_keep_idx_equals_forward_on_subset(name):
    head = make_head(name).eval()
    x = bag()
    keep = torch.tensor([0, 2, 3, 7, 9, 11])
    with torch.no_grad():
        masked = head(x, keep_idx=keep)
        subset = head(x[keep])
    check_output(head, masked, len(keep), 2)
    assert_same_output(masked, subset)


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("batched", [False, True])
def test_extra_tokens_are_appended(name, batched):
    head = make_head(name).eval()
    tokens = torch.randn(3, EMBED_DIM)
    with torch.no_grad():
        out = head(bag(), extra_tokens=tokens.unsqueeze(0) if batched else tokens)
    check_output(head, out, N_INST + 3, 2)
    torch.testing.assert_close(out.instance_embeddings[-3:], tokens)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_three_classes(name):
    head = make_head(name, n_classes=3)
    head.eval()
    with torch.no_grad():
        check_output(head, head(bag()), N_INST, 3)
    head.train()
    y = torch.tensor([2])
    out = head(bag(), label=y)
    assert out.bag_logits.shape == (1, 3)
    check_loss_and_gradients(head, out, y)


def check_loss_and_gradients(head, out, y) -> None:
    """``head.loss`` is the hand-computed cross-entropy of every loss stream (its
    weight applied) plus the auxiliary losses; backward gives finite gradients, not
    all zero."""
    expected = torch.zeros(())
    for weight, logits in head.loss_terms(out):
        z = logits.detach().double()[0]
        nll = torch.log(torch.exp(z - z.max()).sum()) + z.max() - z[int(y)]
        expected = expected + weight * nll
    for value in out.aux_losses.values():
        expected = expected + value.detach().double()
    loss = head.loss(out, y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    head.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_single_instance_bag(name):
    head = make_head(name)
    x = bag(1)
    head.eval()
    with torch.no_grad():
        check_output(head, head(x), 1, 2)
    head.train()
    y = torch.tensor([1])
    out = head(x, label=y)
    check_loss_and_gradients(head, out, y)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_large_bag(name):
    head = make_head(name).eval()
    with torch.no_grad():
        out = head(bag(2000))
    check_output(head, out, 2000, 2)


# ----------------------------------------------------------------- head-specific


def _set_identity(linear: torch.nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.out_features, linear.in_features))
        linear.bias.zero_()


def test_dsmil_critical_instance_attention_by_hand():
    from tiahnm.heads.dsmil import DSMIL

    head = DSMIL(2, 2, embed_dim=2, query_dim=2, dropout=0.0).eval()
    _set_identity(head.embed[0])
    _set_identity(head.instance_classifier)
    _set_identity(head.q[0])
    _set_identity(head.q[2])
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    with torch.no_grad():
        out = head(x)
    # h = x, instance logits c = x: critical instance of class 0 is #2, of class 1 #1.
    torch.testing.assert_close(out.instance_logits, x)
    q = [[math.tanh(v) for v in row] for row in x.tolist()]
    expected = []
    for critical in (2, 1):
        logits = [
            (q[i][0] * q[critical][0] + q[i][1] * q[critical][1]) / math.sqrt(2)
            for i in range(3)
        ]
        total = sum(math.exp(v) for v in logits)
        expected.append([math.exp(v) / total for v in logits])
    torch.testing.assert_close(out.attention, torch.tensor(expected))
    # Binary max stream: the instance with the largest margin c1 - c0 is #1 (2 - 0).
    torch.testing.assert_close(
        out.extras["max_instance_logits"], torch.tensor([[0.0, 2.0]])
    )


def test_abmil_attention_is_softmax_of_hand_computation():
    from tiahnm.heads.abmil import ABMIL

    torch.manual_seed(0)
    head = ABMIL(IN_DIM, 2, embed_dim=EMBED_DIM, attn_dim=8).eval()
    x = bag(7)
    with torch.no_grad():
        out = head(x)
        h = torch.relu(x @ head.embed[0].weight.T + head.embed[0].bias)
        att = head.attention
        e = torch.tanh(h @ att.V.weight.T + att.V.bias) @ att.w.weight.T + att.w.bias
        a = torch.exp(e[:, 0] - e[:, 0].max())
        a = a / a.sum()
    torch.testing.assert_close(out.instance_embeddings, h)
    torch.testing.assert_close(out.attention, a.unsqueeze(0))
    torch.testing.assert_close(out.bag_embedding, (a.unsqueeze(1) * h).sum(0, True))
    torch.testing.assert_close(
        head.instance_scores(out, "attention"), a, rtol=1e-5, atol=1e-6
    )


def _transmil_cls_attention_by_hand(head, x: torch.Tensor) -> torch.Tensor:
    """First-layer class-token attention [H, N] computed from the weights."""
    n = x.shape[0]
    h = head.embed(x)
    side = math.ceil(math.sqrt(n))
    idx = torch.arange(side * side - n) % n
    tokens = torch.cat([head.cls_token, h, h[idx]])
    normed = head.layer1.norm(tokens)
    attn = head.layer1.attn
    q, k, _ = (normed @ attn.to_qkv.weight.T).chunk(3, dim=-1)
    heads, d = attn.n_heads, attn.head_dim
    q = q.view(-1, heads, d).transpose(0, 1)
    k = k.view(-1, heads, d).transpose(0, 1)
    row = torch.softmax((q[:, 0:1] @ k.transpose(1, 2))[:, 0] / math.sqrt(d), dim=-1)
    real = row[:, 1 : n + 1]
    return real / real.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("n, side", [(10, 4), (16, 4), (1, 1), (2, 2), (17, 5)])
def test_transmil_pads_to_square(n, side):
    from tiahnm.heads.transmil import TransMIL

    h = torch.randn(n, 8)
    tokens, got_side = TransMIL.pad_to_square(h)
    assert got_side == side
    assert tokens.shape == (side * side, 8)
    torch.testing.assert_close(tokens[:n], h)
    idx = torch.arange(side * side - n) % n
    torch.testing.assert_close(tokens[n:], h[idx])


@pytest.mark.parametrize("num_landmarks", [256, 6])
def test_transmil_sequence_and_attention(num_landmarks):
    from tiahnm.heads.transmil import TransMIL

    torch.manual_seed(0)
    head = TransMIL(
        IN_DIM, 2, embed_dim=EMBED_DIM, n_heads=4, num_landmarks=num_landmarks
    ).eval()
    seen = []
    handle = head.layer1.register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape)
    )
    x = bag(10)
    with torch.no_grad():
        out = head(x)
        expected = _transmil_cls_attention_by_hand(head, x)
    handle.remove()
    # N = 10 -> padded to 16 tokens, plus the class token.
    assert seen == [torch.Size([17, EMBED_DIM])]
    assert out.attention.shape == (4, 10)
    assert out.extras["layer1_values"].shape == (4, 10, EMBED_DIM // 4)
    torch.testing.assert_close(out.attention, expected)
    assert out.bag_embedding.shape == (1, EMBED_DIM)


def test_transmil_instance_logits_use_attention_weighted_values():
    from tiahnm.heads.transmil import TransMIL

    torch.manual_seed(0)
    head = TransMIL(IN_DIM, 2, embed_dim=EMBED_DIM, n_heads=4).eval()
    with torch.no_grad():
        out = head(bag(9))
        logits = head._instance_logits(out)
        a, v = out.attention, out.extras["layer1_values"]
        i = 4
        merged = torch.cat([a[j, i] * v[j, i] for j in range(4)])
        z = head.layer1.attn.to_out(merged)
    torch.testing.assert_close(logits[i], head.classifier(z))
    probs = head.instance_scores(out, "instance_prob")
    torch.testing.assert_close(probs, torch.softmax(logits, -1)[:, 1])


def test_nystrom_pinv_and_landmarks():
    from tiahnm.heads.transmil import iterative_pinv, segment_means

    gen = torch.Generator().manual_seed(0)
    x = torch.softmax(3 * torch.randn(2, 6, 6, generator=gen), dim=-1)
    x = x + torch.eye(6)
    torch.testing.assert_close(
        iterative_pinv(x, 20), torch.linalg.pinv(x), rtol=1e-4, atol=1e-4
    )
    seq = torch.arange(10.0).view(1, 10, 1)
    means = segment_means(seq, 4).flatten()
    torch.testing.assert_close(means, torch.tensor([1.0, 4.0, 6.5, 8.5]))


def test_nystrom_approximates_exact_attention():
    from tiahnm.heads.transmil import NystromAttention

    torch.manual_seed(0)
    exact = NystromAttention(16, n_heads=2, num_landmarks=64, dropout=0.0)
    approx = NystromAttention(
        16, n_heads=2, num_landmarks=20, pinv_iterations=20, dropout=0.0
    )
    approx.load_state_dict(exact.state_dict())
    # Smooth tokens (a random walk) make the attention matrix nearly low-rank.
    x = torch.randn(40, 16).cumsum(0) * 0.05
    with torch.no_grad():
        out_exact, cls_exact, _ = exact(x)
        out_approx, cls_approx, _ = approx(x)
    torch.testing.assert_close(cls_approx, cls_exact)
    err = (out_exact - out_approx).abs().max() / out_exact.abs().max()
    assert err < 0.05


def test_smooth_top1_svm_by_hand():
    from tiahnm.heads.clam import smooth_top1_svm_loss

    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    target = torch.tensor([0, 0])
    expected = (
        math.log(math.exp(2.0) + math.exp(1.0))
        - 2.0
        + math.log(math.exp(0.5) + math.exp(2.5))
        - 0.5
    ) / 2
    loss = smooth_top1_svm_loss(logits, target)
    torch.testing.assert_close(loss, torch.tensor(expected))
    # Without a margin it is the cross-entropy.
    torch.testing.assert_close(
        smooth_top1_svm_loss(logits, target, alpha=0.0),
        F.cross_entropy(logits, target),
    )


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
@pytest.mark.parametrize("inst_loss", ["svm", "ce"])
def test_clam_instance_loss_only_in_training_with_label(name, inst_loss):
    head = make_head(name, inst_loss=inst_loss, dropout=0.0)
    x, y = bag(), torch.tensor([1])
    head.eval()
    assert not head(x, label=y).aux_losses
    head.train()
    assert not head(x).aux_losses
    out = head(x, label=y)
    assert set(out.aux_losses) == {"instance"}
    with torch.no_grad():
        raw = head.instance_loss(out.attention, out.instance_embeddings, y)
    torch.testing.assert_close(out.aux_losses["instance"], 0.3 * raw)
    bag_ce = F.cross_entropy(out.bag_logits, y)
    torch.testing.assert_close(
        head.loss(out, y), 0.7 * bag_ce + out.aux_losses["instance"]
    )
    expected_rows = 2 if name == "clam_mb" else 1
    assert out.attention.shape == (expected_rows, N_INST)


def test_clam_subtyping_trains_every_instance_classifier():
    head = make_head("clam_mb", n_classes=3, subtyping=True).train()
    y = torch.tensor([0])
    out = head(bag(), label=y)
    head.loss(out, y).backward()
    for clf in head.instance_classifiers:
        assert clf.weight.grad is not None
        assert clf.weight.grad.abs().sum() > 0  # every class's classifier learns


def test_clam_instance_classifier_gives_instance_logits():
    head = make_head("clam_sb").eval()
    with torch.no_grad():
        out = head(bag())
        expected = head.instance_classifiers[1](out.instance_embeddings)
    torch.testing.assert_close(out.instance_logits, expected)


def test_dtfd_eval_is_deterministic_and_keeps_global_rng():
    head = make_head("dtfd").eval()
    x = bag(37)
    state = torch.get_rng_state()
    with torch.no_grad():
        first = head(x)
        second = head(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert_same_output(first, second, exact=True)
    assert first.extras["tier1_logits"].shape == (4, 2)
    assert first.attention.shape == (1, 37)
    torch.testing.assert_close(first.attention.sum(), torch.tensor(1.0))
    # Every pseudo-bag's attention sums to 1 / G.
    groups = head.split(37)
    for idx in groups:
        torch.testing.assert_close(first.attention[0, idx].sum(), torch.tensor(0.25))


def test_dtfd_tier1_loss_in_training():
    head = make_head("dtfd").train()
    x, y = bag(), torch.tensor([1])
    assert "tier1" not in head(x).aux_losses
    out = head(x, label=y)
    assert set(out.aux_losses) == {"tier1"}
    expected = F.cross_entropy(out.extras["tier1_logits"], y.expand(4))
    torch.testing.assert_close(out.aux_losses["tier1"], expected)
    torch.testing.assert_close(
        head.loss(out, y), F.cross_entropy(out.bag_logits, y) + expected
    )
    # Train-mode splits are drawn from the global RNG: reproducible under a seed.
    torch.manual_seed(5)
    a = head.split(20)
    torch.manual_seed(5)
    b = head.split(20)
    assert all(torch.equal(i, j) for i, j in zip(a, b, strict=True))
    assert sorted(torch.cat(a).tolist()) == list(range(20))


@pytest.mark.parametrize("distill", ["afs", "maxs", "maxmins"])
def test_dtfd_distill_modes_and_small_bags(distill):
    head = make_head("dtfd", distill=distill)
    y = torch.tensor([0])
    for n in (3, 9):
        head.train()
        out = head(bag(n), label=y)
        assert out.extras["tier1_logits"].shape == (min(4, n), 2)
        head.loss(out, y).backward()
        head.eval()
        with torch.no_grad():
            check_output(head, head(bag(n)), n, 2)


def test_dtfd_instance_logits_use_whole_slide_attention():
    head = make_head("dtfd").eval()
    with torch.no_grad():
        out = head(bag())
        h = out.instance_embeddings
        a = torch.softmax(head.attention1(h)[0], dim=0)
        expected = head.classifier1(a.unsqueeze(1) * h)
    torch.testing.assert_close(out.instance_logits, expected)


@pytest.mark.parametrize("n, num_landmarks", [(40, 64), (41, 8), (300, 16), (7, 3)])
def test_nystrom_first_row_equals_the_full_layer(n, num_landmarks):
    """The class-token-only path of the last layer: same value, same gradients."""
    from tiahnm.heads.transmil import TransLayer

    torch.manual_seed(0)
    layer = TransLayer(
        16, n_heads=2, num_landmarks=num_landmarks, pinv_iterations=6, dropout=0.0
    )
    # float32: the Nystrom kernels are computed in float32 whatever the input.
    x = torch.randn(n, 16).requires_grad_()
    full = layer(x)[0][:1]
    (g_full,) = torch.autograd.grad(full.square().sum(), x)
    first = layer.forward_first(x)
    (g_first,) = torch.autograd.grad(first.square().sum(), x)
    torch.testing.assert_close(first, full)
    torch.testing.assert_close(g_first, g_full, rtol=1e-4, atol=1e-6)


# ------------------------------------------------- permutation, padding, checkpoint

# Heads whose output depends on instance order by design: TransMIL's PPEG convolves
# the token sequence folded into a square; DTFD splits the bag into pseudo-bags by
# position.
ORDER_DEPENDENT = {"transmil", "dtfd"}


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_permutation_invariance(name):
    head = make_head(name).eval()
    x = bag()
    perm = torch.randperm(N_INST, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out, shuffled = head(x), head(x[perm])
    if name in ORDER_DEPENDENT:
        assert not torch.allclose(out.bag_logits, shuffled.bag_logits, atol=1e-6), (
            f"{name} is allow-listed as order dependent but gave the same logits"
        )
        return
    torch.testing.assert_close(
        shuffled.bag_logits, out.bag_logits, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        shuffled.instance_embeddings,
        out.instance_embeddings[perm],
        rtol=1e-5,
        atol=1e-5,
    )
    if out.attention is not None:
        torch.testing.assert_close(
            shuffled.attention, out.attention[:, perm], rtol=1e-5, atol=1e-6
        )
    for kind in head.supported_scores:
        torch.testing.assert_close(
            head.instance_scores(shuffled, kind),
            head.instance_scores(out, kind)[perm],
            rtol=1e-5,
            atol=1e-6,
        )


PADDED_HEADS = [n for n in HEAD_NAMES if make_head(n).supports_padding()]


def test_padding_heads_found():
    assert {"abmil", "abmil_gated", "mean_pool", "max_pool"} <= set(PADDED_HEADS)


@pytest.mark.parametrize("name", PADDED_HEADS)
def test_padded_batch_equals_per_bag_forward(name):
    head = make_head(name).eval()
    bags = [bag(n, seed=s) for s, n in enumerate((3, 12, 7))]
    n_max = max(b.shape[0] for b in bags)
    x = torch.zeros(len(bags), n_max, IN_DIM)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : b.shape[0]] = b
        # padding rows hold garbage: a correct mask makes them irrelevant
        x[i, b.shape[0] :] = 1e3
        mask[i, : b.shape[0]] = True
    with torch.no_grad():
        padded = head.forward_padded(x, mask)
        single = torch.cat([head(b).bag_logits for b in bags])
    torch.testing.assert_close(padded, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    head = make_head(name, seed=4).eval()
    path = tmp_path / "head.pt"
    torch.save(head.state_dict(), path)
    fresh = make_head(name, seed=9).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = bag()
    with torch.no_grad():
        assert_same_output(head(x), fresh(x), exact=True)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_declared_capabilities(name):
    head = make_head(name)
    assert head.mining_score() in head.supported_scores
    assert isinstance(head.supports_padding(), bool)
    if head.encodes_images:
        assert head.feature_dim == head.head.in_dim
        assert math.prod(head.image_shape) == head.in_dim
        with torch.no_grad():
            feats = head.encoder(bag().reshape(-1, *head.image_shape))
        assert feats.shape == (N_INST, head.feature_dim)
    else:
        with (
            pytest.raises(NotImplementedError)
            if not head.supports_padding()
            else (torch.no_grad())
        ):
            head.forward_padded(
                bag().unsqueeze(0), torch.ones(1, N_INST, dtype=torch.bool)
            )


def test_dsmil_mines_by_its_instance_classifier():
    assert make_head("dsmil").mining_score() == "instance_logit"
    assert make_head("abmil").mining_score() == "attention"
