"""Models a user might bring, selected only through ``model._target_`` in the tests (issue 10).

Each takes ``input_shape``/``num_classes`` by name or not at all, the way a user's code would.
"""

from __future__ import annotations

import torch
from torch import nn


def _seq(x: torch.Tensor) -> torch.Tensor:
    """(N, L) sequences or (N, C, L) -> (N, C, L)."""
    return x.unsqueeze(1) if x.dim() == 2 else x


class ResidualBlock(nn.Module):
    """conv-BN-ReLU x2 with an identity skip."""

    def __init__(self, c: int, depthwise: bool = False):
        super().__init__()
        self.conv1 = nn.Conv1d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(c)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1, groups=c if depthwise else 1, bias=False)
        self.bn2 = nn.BatchNorm1d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class UserNet(nn.Module):
    """A user's class taking ``input_shape`` and ``num_classes``: stem conv, a residual block with a
    depthwise conv, LayerNorm + nn.MultiheadAttention over the positions, an MLP, a linear head."""

    def __init__(self, input_shape, num_classes: int, width: int = 16, heads: int = 4):
        super().__init__()
        self.sequence = len(input_shape) == 1  # (N, L) batches get a channel axis
        cin = 1 if self.sequence else input_shape[0]
        self.stem = nn.Conv1d(cin, width, 5, stride=2, padding=2)
        self.block = ResidualBlock(width, depthwise=True)
        self.ln = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x.unsqueeze(1) if self.sequence else x)).transpose(1, 2)  # (N, L, C) tokens
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def user_net_fn(width: int = 8, classes: int = 10) -> nn.Module:
    """A plain function without ``input_shape``/``num_classes`` (MNIST-1D only): ``+model.classes=N``."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, width, 3, padding=1),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Conv1d(width, width, 3, padding=1, groups=width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * 40, classes),
    )


class SliceCat(nn.Module):
    """The issue's "+ torch.cat of slices": half the channels pass, half go through a conv."""

    def __init__(self, input_shape=(40,), num_classes: int = 10, c: int = 16):
        super().__init__()
        self.stem = nn.Conv1d(1, c, 3, padding=1)
        self.conv = nn.Conv1d(c // 2, c // 2, 3, padding=1)
        self.mix = nn.Conv1d(c, c, 1)
        self.head = nn.Linear(c, num_classes)
        self.c = c

    def forward(self, x):
        x = torch.relu(self.stem(_seq(x)))
        x = torch.cat([x[:, : self.c // 2], self.conv(x[:, self.c // 2 :])], dim=1)
        return self.head(torch.relu(self.mix(x)).mean(2))


class Grouped(nn.Module):
    """A ResNeXt-style bottleneck: 1x1 -> grouped 3x3 (4 groups) -> 1x1, with a residual."""

    def __init__(self, input_shape=(40,), num_classes: int = 10, c: int = 16, inner: int = 16):
        super().__init__()
        self.stem = nn.Conv1d(1, c, 3, padding=1)
        self.a = nn.Conv1d(c, inner, 1)
        self.b = nn.Conv1d(inner, inner, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm1d(inner)
        self.c = nn.Conv1d(inner, c, 1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(_seq(x)))
        x = x + self.c(torch.relu(self.bn(self.b(torch.relu(self.a(x))))))
        return self.head(x.mean(2))


class ChannelMean(nn.Module):
    """Centres each position over the channels: removing a channel changes that mean, masking it
    does not. Channel pruning cannot handle it and must refuse it."""

    def __init__(self, input_shape=(40,), num_classes: int = 10, c: int = 8):
        super().__init__()
        self.stem = nn.Conv1d(1, c, 3, padding=1)
        self.mix = nn.Conv1d(c, c, 1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(_seq(x)))
        x = torch.relu(self.mix(x - x.mean(1, keepdim=True)))
        return self.head(x.mean(2))


class NotAModel:
    """A callable that does not return an nn.Module."""

    def __init__(self, num_classes: int = 10):
        self.num_classes = num_classes


def wrong_classes(input_shape, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 1000))
