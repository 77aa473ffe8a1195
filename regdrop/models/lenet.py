"""The LeNet-like network of the Gyro dropout paper (Lee et al., MLSys 2022).

conv5x5(96)-pool-conv5x5(256)-pool-FC1024-FC1024-FC, ReLU after every hidden layer (the
TensorFlow CIFAR-10 tutorial layout the authors build on). An ``fc`` drop site follows each
hidden FC layer (where the paper puts p=0.5 dropout) and a ``conv`` site each conv block.
"""

from __future__ import annotations

from torch import nn

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite


def scaled(channels: int, width: float) -> int:
    """``channels * width``, at least 8."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(8, round(channels * width))


def conv_block(cin: int, cout: int, pool: bool = True) -> list[nn.Module]:
    """conv5x5 (same padding), ReLU, optionally a 2x2 max-pool, then a conv drop site."""
    layers = [nn.Conv2d(cin, cout, 5, padding=2), nn.ReLU(inplace=True)]
    return [*layers, nn.MaxPool2d(2), DropSite("conv")] if pool else [*layers, DropSite("conv")]


def classifier(features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """FC-FC-FC with an fc drop site after each hidden layer."""
    return nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(inplace=True), DropSite("fc"),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), DropSite("fc"),
        nn.Linear(hidden, num_classes),
    )


class ConvNet(nn.Module):
    """Conv feature extractor, flatten, FC classifier."""

    regdrop_dropconnect_layers = ["classifier.0", "classifier.3"]

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def build_lenet(info: DataInfo, width: float = 1.0) -> ConvNet:
    c1, c2, hidden = scaled(96, width), scaled(256, width), scaled(1024, width)
    side = info.image_size // 4
    if side < 1:
        raise ValueError(f"lenet needs images of at least 4 px, got {info.image_size}")
    features = nn.Sequential(*conv_block(info.channels, c1), *conv_block(c1, c2))
    return ConvNet(features, classifier(c2 * side * side, hidden, info.num_classes))
