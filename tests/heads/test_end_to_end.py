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
