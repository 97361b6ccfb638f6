"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, stages of 16/32/64 channels.

Shortcut **option B**: a 1x1 convolution + BatchNorm where the shape changes (the first block of
stages 2 and 3), identity elsewhere. Option A (zero-padded, subsampled identity) has no parameters
but pads channels with constant zeros, which channel pruning cannot couple to the residual stream;
option B costs 2,752 parameters more in ResNet-20 (0.27M either way).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from qpexp.models.common import Signal, signal


class BasicBlock(nn.Module):
    def __init__(self, s: Signal, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = s.conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = s.bn(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = s.conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = s.bn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                OrderedDict(conv=s.conv(cin, cout, 1, stride=stride, bias=False), bn=s.bn(cout))
            )
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, input_shape, num_classes: int, depth: int = 20, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"model.depth={depth}: a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        s = signal(input_shape, f"resnet{depth}")
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.reshape = s.reshape()
        self.conv1 = s.conv(s.channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = s.bn(widths[0])
        self.relu = nn.ReLU()
        cin, stages = widths[0], []
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(s, cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = s.avgpool
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(self.reshape(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(input_shape, num_classes: int, width: float = 1.0) -> ResNet:
    return ResNet(input_shape, num_classes, 20, width)


def resnet32(input_shape, num_classes: int, width: float = 1.0) -> ResNet:
    return ResNet(input_shape, num_classes, 32, width)


def resnet56(input_shape, num_classes: int, width: float = 1.0) -> ResNet:
    return ResNet(input_shape, num_classes, 56, width)
