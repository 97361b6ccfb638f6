"""Shared pieces of the built-in architectures: one builder per family serves 1-D sequences and images.

Input shapes (per sample, as the data module reports them):

* ``(L,)`` and ``(C, L)``: sequences (MNIST-1D is ``(40,)``), built with ``Conv1d``/``BatchNorm1d``;
* ``(C, H, W)``: images, built with ``Conv2d``/``BatchNorm2d``.

Give grayscale images a channel axis (``(1, H, W)``): a 2-D sample is read as ``(C, L)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Reshape(nn.Module):
    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


@dataclass(frozen=True)
class Signal:
    """The data's sample layout: ``dims`` spatial dimensions (1 or 2), ``channels``, ``size``."""

    dims: int
    channels: int
    size: tuple[int, ...]

    @property
    def conv(self) -> type[nn.Module]:
        return (nn.Conv1d, nn.Conv2d)[self.dims - 1]

    @property
    def bn(self) -> type[nn.Module]:
        return (nn.BatchNorm1d, nn.BatchNorm2d)[self.dims - 1]

    @property
    def maxpool(self) -> type[nn.Module]:
        return (nn.MaxPool1d, nn.MaxPool2d)[self.dims - 1]

    @property
    def avgpool(self) -> nn.Module:
        return (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[self.dims - 1](1)

    def reshape(self) -> Reshape:
        """The first module: (N, L) -> (N, 1, L); a no-op reshape for (N, C, ...) data."""
        return Reshape(self.channels, *self.size)


def signal(input_shape, model: str) -> Signal:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 1:
        return Signal(1, 1, shape)
    if len(shape) == 2:
        return Signal(1, shape[0], shape[1:])
    if len(shape) == 3:
        return Signal(2, shape[0], shape[1:])
    raise ValueError(
        f"model={model} takes sequences (L,) or (C, L) and images (C, H, W); the data has samples of shape "
        f"{shape}"
    )


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of ``divisor``, never 10% below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new
