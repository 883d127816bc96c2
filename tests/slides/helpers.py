"""Importable test modules (for the ``module`` encoder)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """``[B, 3, H, W] -> [B, width, h, w]`` (pooled by the wrapper)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
