"""Model builders: each takes the data's ``input_shape`` (per sample) and ``num_classes``.

Configs instantiate them with ``_partial_: true``; the pipeline supplies the data's shape.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from qpexp.models.common import Reshape
from qpexp.models.gru import GRU, gru  # noqa: F401 (re-exported; formerly qpexp.archs)
from qpexp.models.mobilenet import MobileNetV2, mobilenetv2  # noqa: F401 (re-exported; formerly qpexp.archs)
from qpexp.models.resnet import ResNet, resnet20, resnet32, resnet56  # noqa: F401 (re-exported; formerly qpexp.archs)
from qpexp.models.transformer import Transformer, transformer  # noqa: F401 (re-exported; formerly qpexp.archs)
from qpexp.models.vgg import VGG, vgg11, vgg16  # noqa: F401 (re-exported; formerly qpexp.archs)


def _signal_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int]:
    if len(input_shape) == 1:
        return 1, input_shape[0]
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    raise ValueError(
        f"model={model} needs 1-D signals (N, L) or (N, C, L); the data has samples of shape {input_shape}"
    )


def cnn1d(input_shape, num_classes: int, channels: int = 25, batchnorm: bool = False) -> nn.Sequential:
    """The MNIST-1D paper's CNN (Greydanus 2020): three stride-2 convs and a linear head (5,210 params
    on MNIST-1D)."""
    cin, length = _signal_shape(tuple(input_shape), "cnn1d")
    layers: list[tuple[str, nn.Module]] = [("reshape", Reshape(cin, length))]
    for i, (k, c_in) in enumerate([(5, cin), (3, channels), (3, channels)], start=1):
        layers.append((f"conv{i}", nn.Conv1d(c_in, channels, k, stride=2, padding=1)))
        if batchnorm:
            layers.append((f"bn{i}", nn.BatchNorm1d(channels)))
        layers.append((f"relu{i}", nn.ReLU()))
        length = (length + 2 - k) // 2 + 1
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(channels * length, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def mlp(input_shape, num_classes: int, hidden: tuple[int, ...] = (100, 100)) -> nn.Sequential:
    """A plain MLP (MNIST-1D paper: 40-100-100-10)."""
    n_in = math.prod(input_shape)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i, h in enumerate(hidden, start=1):
        layers += [(f"fc{i}", nn.Linear(n_in, h)), (f"relu{i}", nn.ReLU())]
        n_in = h
    layers.append((f"fc{len(hidden) + 1}", nn.Linear(n_in, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def lenet300(input_shape, num_classes: int) -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998; the pruning literature's classic MLP)."""
    return mlp(input_shape, num_classes, hidden=(300, 100))


def lenet5(input_shape, num_classes: int, batchnorm: bool = False) -> nn.Sequential:
    """LeNet-5-style 2D CNN: conv(6,5x5)-pool-conv(16,5x5)-pool-120-84-C. Small images (e.g. 8x8)
    get 'same' padding so that both convolutions fit."""
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise ValueError(
            f"model=lenet5 needs images (N, H, W) or (N, C, H, W); the data has samples of shape {input_shape}"
        )
    c, h, w = shape
    layers: list[tuple[str, nn.Module]] = [("reshape", Reshape(c, h, w))]
    for i, (cin, cout) in enumerate([(c, 6), (6, 16)], start=1):
        pad = 2 if i == 1 or min(h, w) < 10 else 0
        layers.append((f"conv{i}", nn.Conv2d(cin, cout, 5, padding=pad)))
        if batchnorm:
            layers.append((f"bn{i}", nn.BatchNorm2d(cout)))
        layers += [(f"relu{i}", nn.ReLU()), (f"pool{i}", nn.MaxPool2d(2))]
        h, w = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
        if h < 1 or w < 1:
            raise ValueError(f"model=lenet5: images of shape {input_shape} are too small")
    layers += [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * h * w, 120)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)),
        ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def lenet5_caffe(input_shape, num_classes: int) -> nn.Sequential:
    """The LeNet-5 of the compression papers (Caffe's MNIST example; Han et al. 2015, 2016):
    conv(20, 5x5)-pool-conv(50, 5x5)-pool-fc(500)-relu-fc(C), no padding and no activation between
    the convolutions, 431,080 parameters on 28x28 MNIST. :func:`lenet5` is the smaller classic one."""
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape[1:]) < 12:
        raise ValueError(
            f"model=lenet5_caffe needs images of at least 12x12; the data has samples of shape {input_shape}"
        )
    c, h, w = shape
    h, w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    layers = [
        ("reshape", Reshape(c, *shape[1:])),
        ("conv1", nn.Conv2d(c, 20, 5)),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(20, 50, 5)),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(50 * h * w, 500)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(500, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


ARCHS = ("gru", "resnet20", "resnet32", "resnet56", "vgg11", "vgg16", "mobilenetv2", "transformer")
