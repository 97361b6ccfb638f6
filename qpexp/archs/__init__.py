"""Built-in architectures beyond the Sequential CNNs/MLPs of :mod:`qpexp.models`, one file per family.

Every builder takes the data's per-sample ``input_shape`` and ``num_classes`` first and builds
``Conv1d`` layers for sequences and ``Conv2d`` layers for images (:mod:`qpexp.archs.common`).
"""

from qpexp.archs.gru import GRU, gru
from qpexp.archs.mobilenet import MobileNetV2, mobilenetv2
from qpexp.archs.resnet import ResNet, resnet20, resnet32, resnet56
from qpexp.archs.transformer import Transformer, transformer
from qpexp.archs.vgg import VGG, vgg11, vgg16

__all__ = [
    "GRU",
    "MobileNetV2",
    "ResNet",
    "Transformer",
    "VGG",
    "gru",
    "mobilenetv2",
    "resnet20",
    "resnet32",
    "resnet56",
    "transformer",
    "vgg11",
    "vgg16",
]
