"""AlexNet: the small-image AlexNet-like net of the Gyro dropout paper, or torchvision's.

``variant=small`` (default): conv5x5(96)-pool-conv5x5(256)-pool-conv5x5(384)-
FC1024-FC1024-FC (Lee et al., MLSys 2022), ``fc`` sites after the hidden FC layers and
``conv`` sites after the conv blocks. ``variant=torchvision``: torchvision's ImageNet AlexNet
(for 224 px input), whose two ``nn.Dropout`` become ``fc`` sites.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import alexnet as tv_alexnet

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite
from regdrop.models.lenet import ConvNet, classifier, conv_block, scaled


def build_alexnet(info: DataInfo, variant: str = "small", width: float = 1.0) -> nn.Module:
    if variant == "torchvision":
        if info.image_size < 63:
            raise ValueError("variant=torchvision needs images of at least 63 px; use variant=small")
        model = tv_alexnet(weights=None, num_classes=info.num_classes)
        if info.channels != 3:
            model.features[0] = nn.Conv2d(info.channels, 64, 11, stride=4, padding=2)
        for index in (0, 3):  # classifier: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear
            model.classifier[index] = DropSite("fc")
        model.regdrop_dropconnect_layers = ["classifier.1", "classifier.4"]
        return model
    if variant != "small":
        raise ValueError(f"variant must be 'small' or 'torchvision', got {variant!r}")
    c1, c2, c3, hidden = (scaled(c, width) for c in (96, 256, 384, 1024))
    side = info.image_size // 4
    if side < 1:
        raise ValueError(f"alexnet (small) needs images of at least 4 px, got {info.image_size}")
    features = nn.Sequential(
        *conv_block(info.channels, c1), *conv_block(c1, c2), *conv_block(c2, c3, pool=False)
    )
    return ConvNet(features, classifier(c3 * side * side, hidden, info.num_classes))
