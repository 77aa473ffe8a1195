"""torchvision ResNets (BasicBlock ResNet-18, Bottleneck ResNet-50) with a width knob.

The blocks are torchvision's own classes, so stochastic depth and any other tool that
knows torchvision's ResNet find them. Images up to 64 px get the CIFAR stem (3x3 conv,
stride 1, no max-pool). ResNets ship with no dropout: an ``fc`` drop site sits before the
classifier (``fc`` becomes ``Sequential(DropSite, Linear)``) and a ``conv`` site ends each
stage (``layerN`` is ``Sequential(*blocks, DropSite)``), for spatial dropout.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite
from regdrop.models.lenet import scaled

SMALL_IMAGE = 64


class ScaledResNet(ResNet):
    """torchvision's ResNet with every stage's width scaled and an adjustable stem."""

    regdrop_dropconnect_layers = ["fc.1"]

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        info: DataInfo,
        width: float,
    ) -> None:
        nn.Module.__init__(self)
        widths = [scaled(64 * 2**i, width) for i in range(4)]
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        if info.image_size <= SMALL_IMAGE:
            self.conv1 = nn.Conv2d(info.channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(info.channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0]).append(DropSite("conv"))
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2).append(DropSite("conv"))
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2).append(DropSite("conv"))
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2).append(DropSite("conv"))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            DropSite("fc"), nn.Linear(widths[3] * block.expansion, info.num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Zero-init the last BN of each residual branch (torchvision's zero_init_residual,
        # Goyal et al. 2017): every block starts as the identity, so training from scratch
        # at a plain SGD learning rate is stable from the first step.
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)


def build_resnet18(info: DataInfo, width: float = 1.0) -> ScaledResNet:
    return ScaledResNet(BasicBlock, [2, 2, 2, 2], info, width)


def build_resnet50(info: DataInfo, width: float = 1.0) -> ScaledResNet:
    return ScaledResNet(Bottleneck, [3, 4, 6, 3], info, width)
