"""torchvision ResNets: ImageNet-style ResNet-18/50/101 and the CIFAR ResNet-56/110.

The blocks are torchvision's own classes (``BasicBlock``, ``Bottleneck``), so stochastic
depth and any other tool that knows torchvision's ResNet find them.

* ``resnet18``, ``resnet50``, ``resnet101``: torchvision's layouts ([2, 2, 2, 2] basic,
  [3, 4, 6, 3] and [3, 4, 23, 3] bottleneck blocks; 11.7M, 25.6M and 44.5M parameters at
  1000 classes) with a width knob. Images up to 64 px get the CIFAR stem (3x3 conv,
  stride 1, no max-pool). ResNet-50/101 are Composer's stochastic-depth card models.
* ``resnet56``, ``resnet110``: the CIFAR ResNets of He et al. (2016) that Huang et al.
  (ECCV 2016) train with stochastic depth: a 3x3 conv stem with 16 channels, three stages
  of 9 (ResNet-56) or 18 (ResNet-110) basic blocks with 16, 32 and 64 channels (the second
  and third start with stride 2), global average pooling and the classifier; 0.85M and
  1.7M parameters. ``shortcut="A"`` (default) is the parameter-free shortcut of He et al.'s
  CIFAR networks and of Huang et al.'s code where a block changes shape: the input
  subsampled by the stride and zero-padded with the new channels; ``"B"`` a 1x1 conv and
  batch norm projection there. Initialisation is He et al.'s (no zero-initialised
  residual branches, unlike the ImageNet-style models here).

ResNets ship with no dropout: an ``fc`` drop site sits before the classifier (``fc`` is
``Sequential(DropSite, Linear)``) and a ``conv`` site ends each stage (``layerN`` is
``Sequential(*blocks, DropSite)``), for spatial dropout. Every ResNet recommends Gyro
dropout's (sigma, tau) = (1024, 8), the Gyro paper's choice for ResNet-18
(``regdrop_method_defaults``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite
from regdrop.models.lenet import scaled

SMALL_IMAGE = 64
# Lee et al. (MLSys 2022) recommend (sigma, tau) = (1024, 8) for ResNet-18 (and BERT).
RESNET_METHOD_DEFAULTS = {"gyro": {"sigma": 1024, "tau": 8}}


class ScaledResNet(ResNet):
    """torchvision's ResNet with every stage's width scaled and an adjustable stem."""

    regdrop_dropconnect_layers = ["fc.1"]
    regdrop_method_defaults = RESNET_METHOD_DEFAULTS

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


def build_resnet101(info: DataInfo, width: float = 1.0) -> ScaledResNet:
    return ScaledResNet(Bottleneck, [3, 4, 23, 3], info, width)


class ShortcutA(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride``, append ``extra`` zero channels.

    Parameter-free; what Huang et al.'s code does with a stride-``stride`` 1x1 average pool
    and channel padding. Spatial sizes match the block's stride-2, padding-1 3x3 conv for
    odd sizes too (``ceil(n / 2)``).
    """

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra={self.extra}"


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): 3 stages of basic blocks, 16-32-64 channels."""

    regdrop_dropconnect_layers = ["fc.1"]
    regdrop_method_defaults = RESNET_METHOD_DEFAULTS

    def __init__(self, blocks_per_stage: int, info: DataInfo, width: float, shortcut: str) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        widths = [scaled(16 * 2**i, width) for i in range(3)]
        self.conv1 = nn.Conv2d(info.channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for index, planes in enumerate(widths):
            stride = 1 if index == 0 else 2
            layer = []
            for block_index in range(blocks_per_stage):
                block_stride = stride if block_index == 0 else 1
                downsample = None
                if block_stride != 1 or inplanes != planes:
                    downsample = (
                        ShortcutA(block_stride, planes - inplanes) if shortcut == "A" else
                        nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=block_stride, bias=False),
                                      nn.BatchNorm2d(planes))
                    )
                layer.append(BasicBlock(inplanes, planes, block_stride, downsample))
                inplanes = planes
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer, DropSite("conv")))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(DropSite("fc"), nn.Linear(widths[2], info.num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def build_resnet56(info: DataInfo, width: float = 1.0, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(9, info, width, shortcut)


def build_resnet110(info: DataInfo, width: float = 1.0, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(18, info, width, shortcut)
