"""The MNIST-1D paper's GRU (Greydanus 2020, ``mnist1d/models.py``): a bidirectional GRU with 6 hidden
units per direction reads the signal one step at a time; every step's outputs are concatenated and
classified by one linear layer (5,134 parameters on MNIST-1D)."""

from __future__ import annotations

import torch
from torch import nn


class GRU(nn.Module):
    def __init__(
        self, channels: int, length: int, num_classes: int, hidden: int = 6, bidirectional: bool = True
    ):
        super().__init__()
        self.channels, self.length = channels, length
        self.gru = nn.GRU(channels, hidden, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear((2 if bidirectional else 1) * hidden * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.channels, self.length).transpose(
            1, 2
        )  # (N, L, C): one step per sample
        out, _ = self.gru(x)
        return self.fc(out.reshape(out.shape[0], -1))


def gru(input_shape, num_classes: int, hidden: int = 6, bidirectional: bool = True) -> GRU:
    """Sequences ``(L,)`` or ``(C, L)`` only."""
    shape = tuple(input_shape)
    if len(shape) not in (1, 2):
        raise ValueError(
            f"model=gru needs 1-D signals (N, L) or (N, C, L); the data has samples of shape {shape}"
        )
    channels, length = (1, shape[0]) if len(shape) == 1 else shape
    return GRU(channels, length, num_classes, hidden, bidirectional)
