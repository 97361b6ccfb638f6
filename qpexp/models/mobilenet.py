"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride 1 in the stem and the second stage
(32x32 inputs end at 4x4), depthwise 3x3 convolutions, inverted residuals with linear bottlenecks,
a width multiplier (channels rounded to multiples of 8)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from qpexp.models.common import Signal, make_divisible, signal

# (expansion t, output channels c, blocks n, first stride s); ImageNet's stage-2 and stem strides are 1 here
CFG = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    def __init__(self, s: Signal, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[tuple[str, nn.Module]] = []
        if expand != 1:
            layers += [
                ("expand", s.conv(cin, hidden, 1, bias=False)),
                ("bn0", s.bn(hidden)),
                ("relu0", nn.ReLU6()),
            ]
        layers += [
            ("dw", s.conv(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)),
            ("bn1", s.bn(hidden)),
            ("relu1", nn.ReLU6()),
            ("project", s.conv(hidden, cout, 1, bias=False)),
            ("bn2", s.bn(cout)),
        ]
        self.conv = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, input_shape, num_classes: int, width: float = 1.0, last_channel: int = 1280):
        super().__init__()
        s = signal(input_shape, "mobilenetv2")
        cin = make_divisible(32 * width)
        last = make_divisible(last_channel * max(1.0, width))
        self.reshape = s.reshape()
        self.stem = nn.Sequential(
            OrderedDict(conv=s.conv(s.channels, cin, 3, padding=1, bias=False), bn=s.bn(cin), relu=nn.ReLU6())
        )
        blocks = []
        for t, c, n, stride in CFG:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(s, cin, cout, stride if i == 0 else 1, t))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            OrderedDict(conv=s.conv(cin, last, 1, bias=False), bn=s.bn(last), relu=nn.ReLU6())
        )
        self.pool = s.avgpool
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        x = self.head(self.blocks(self.stem(self.reshape(x))))
        return self.fc(self.flatten(self.pool(x)))


def mobilenetv2(input_shape, num_classes: int, width: float = 1.0, last_channel: int = 1280) -> MobileNetV2:
    return MobileNetV2(input_shape, num_classes, width, last_channel)
