"""VGG with BatchNorm, CIFAR variant as in Li et al. 2017 ("Pruning Filters for Efficient ConvNets"):
3x3 conv-BN-ReLU stacks with max-pooling, then Linear(512, 512)-BN-ReLU-Linear(512, C)
(VGG-16: 15.0M parameters, 313M MACs at 32x32).

Small inputs skip a max-pool that would shrink a side below 1; a global average pool before the
classifier (the identity at 32x32, where the features are 1x1) lets any size through.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from qpexp.models.common import signal

CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"] + [512] * 4 + ["M"] + [512] * 4 + ["M"],
}


class VGG(nn.Module):
    def __init__(self, input_shape, num_classes: int, name: str = "vgg16", width: float = 1.0, hidden=512):
        super().__init__()
        s = signal(input_shape, name)
        size = list(s.size)
        layers: list[tuple[str, nn.Module]] = []
        cin, i, p = s.channels, 0, 0
        for v in CFG[name]:
            if v == "M":
                p += 1
                if min(size) >= 2:
                    layers.append((f"pool{p}", s.maxpool(2)))
                    size = [d // 2 for d in size]
                continue
            i += 1
            cout = max(1, round(v * width))
            layers += [
                (f"conv{i}", s.conv(cin, cout, 3, padding=1)),
                (f"bn{i}", s.bn(cout)),
                (f"relu{i}", nn.ReLU()),
            ]
            cin = cout
        self.reshape = s.reshape()
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = s.avgpool
        self.flatten = nn.Flatten()
        hidden = max(1, round(hidden * width))
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(cin, hidden),
                bn=nn.BatchNorm1d(hidden),
                relu=nn.ReLU(),
                fc2=nn.Linear(hidden, num_classes),
            )
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(self.reshape(x)))))


def vgg11(input_shape, num_classes: int, width: float = 1.0) -> VGG:
    return VGG(input_shape, num_classes, "vgg11", width)


def vgg16(input_shape, num_classes: int, width: float = 1.0) -> VGG:
    return VGG(input_shape, num_classes, "vgg16", width)
