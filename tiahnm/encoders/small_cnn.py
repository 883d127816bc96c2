"""A small CNN patch encoder, trainable end to end with a MIL head on small bags."""

from __future__ import annotations

import torch
from torch import nn

from tiahnm.encoders.base import Preprocessing


class SmallCNN(nn.Module):
    """Three conv blocks and global average pooling (the Ilse et al. UCSB/MNIST style).

    Args:
        out_dim (int): Feature width ``D``.
        in_channels (int): Image channels (3 for RGB, 1 for MNIST).
        width (int): Channels of the first block (doubled twice).

    Attributes:
        out_dim (int): Feature width.
        preprocessing (Preprocessing): For slide extraction: patches keep their size
            and are scaled to ``[-1, 1]``.
    """

    def __init__(
        self, *, out_dim: int = 128, in_channels: int = 3, width: int = 32
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.preprocessing = Preprocessing(
            input_size=None, mean=(0.5,) * in_channels, std=(0.5,) * in_channels
        )
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, width * 2, 3, padding=1),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width * 2, out_dim, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` float images to ``[B, out_dim]`` features."""
        return self.net(x)
