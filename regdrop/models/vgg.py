"""VGG-16 with batch normalisation for small images: the multi-sample dropout CIFAR network.

Inoue (2019) trains a VGG-like convolutional network with batch normalisation on CIFAR-10
and CIFAR-100 and applies multi-sample dropout to the dropout before its final fully
connected layer; the paper does not list that network layer by layer. This is its
closest well-documented equivalent: VGG-16's convolutional layout (configuration "D" of
Simonyan & Zisserman, taken from torchvision: 13 3x3 convs of 64-64, 128-128,
256-256-256, 512-512-512, 512-512-512 maps, each followed by batch norm and ReLU, a 2x2
max-pool after each group), then global average pooling (1 x 1 already at 32 px) and a
two-layer classifier, dropout-FC512-ReLU-dropout-FC, as in the common CIFAR VGG-16s with
dropout. Multi-sample dropout duplicates the last dropout and FC layer.

Pools use ``ceil_mode`` so that any image of at least 1 px keeps a non-empty map through
five pools (28 px: 14-7-4-2-1). Sites: an ``fc`` site before each FC layer, a ``conv``
site after each pool (spatial dropout), the hidden FC layer for DropConnect. ``width``
scales every layer (1.0 = the sizes above; 14.7M conv + 0.3M head parameters).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite
from regdrop.models.lenet import scaled


class VGG(nn.Module):
    """VGG feature layers, global average pooling, FC classifier."""

    regdrop_dropconnect_layers = ["classifier.1"]

    def __init__(self, info: DataInfo, width: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = info.channels
        for entry in cfgs["D"]:
            if entry == "M":
                layers += [nn.MaxPool2d(2, 2, ceil_mode=True), DropSite("conv")]
            else:
                out = scaled(int(entry), width)
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out),
                           nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            DropSite("fc"), nn.Linear(channels, hidden), nn.ReLU(inplace=True),
            DropSite("fc"), nn.Linear(hidden, info.num_classes),
        )
        # torchvision's VGG initialisation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def build_vgg16(info: DataInfo, width: float = 1.0) -> VGG:
    return VGG(info, width)
