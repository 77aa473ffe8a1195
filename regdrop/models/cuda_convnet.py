"""The CIFAR-10 network of the DropConnect paper's first CIFAR-10 table (Wan et al., 2013).

Wan et al. put a 64-unit fully connected layer, trained with no-drop, dropout or
DropConnect, on top of "the simple convolutional network feature extractor described in
(Krizhevsky, 2012)": cuda-convnet's ``layers-80sec.cfg``, three 5x5 conv layers with 32,
32 and 64 maps, built for fast training rather than the best accuracy (their Table 4, no
data augmentation). Layer by layer, as that file defines it:

* conv 5x5, 32 maps (padding 2) -> max-pool 3x3 stride 2 -> ReLU -> response norm 3x3
* conv 5x5, 32 maps -> ReLU -> average-pool 3x3 stride 2 -> response norm 3x3
* conv 5x5, 64 maps -> ReLU -> average-pool 3x3 stride 2
* fully connected, 64 ReLU units (the dropped layer) -> fully connected to the classes

cuda-convnet's pools cover the border with a last partial window (32 -> 16 -> 8 -> 4),
hence ``ceil_mode``. Its ``rnorm`` layer divides each unit by
``(1 + scale / size**2 * sum of squares over the size x size neighbourhood in the same
map) ** power`` with the file's scale 5e-5 and power 0.75 (`ResponseNorm2d`; torch's
``LocalResponseNorm`` normalises across maps instead).

Sites: an ``fc`` site after the 64-unit layer (dropout), that layer's weights for
DropConnect (``regdrop_dropconnect_layers``), and a ``conv`` site after each conv block.
``width`` scales every layer (1.0 = the sizes above).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite
from regdrop.models.lenet import ConvNet, scaled


class ResponseNorm2d(nn.Module):
    """cuda-convnet's ``rnorm``: local response normalisation within each map.

    ``x / (1 + scale * mean of x**2 over the size x size window) ** power``, the window
    centred on the unit and zero outside the image (so the mean is the neighbourhood's
    sum divided by ``size**2``, as cuda-convnet's scale is).
    """

    def __init__(self, size: int = 3, scale: float = 5e-5, power: float = 0.75) -> None:
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"size must be a positive odd number, got {size}")
        self.size, self.scale, self.power = size, scale, power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2,
                             count_include_pad=True)
        return x / (1.0 + self.scale * local).pow(self.power)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, power={self.power}"


def pooled_size(size: int) -> int:
    """Side after a 3x3 stride-2 ceil-mode pool (cuda-convnet's output count)."""
    return (size - 2) // 2 + 1


def build_cuda_convnet(info: DataInfo, width: float = 1.0) -> ConvNet:
    c1, c2, c3, hidden = (scaled(c, width) for c in (32, 32, 64, 64))
    side = info.image_size
    for _ in range(3):
        if side < 3:  # every 3x3 pool needs a full window to start from
            raise ValueError(f"cuda_convnet needs images of at least 12 px, got {info.image_size}")
        side = pooled_size(side)
    features = nn.Sequential(
        nn.Conv2d(info.channels, c1, 5, padding=2),
        nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(inplace=True), ResponseNorm2d(),
        DropSite("conv"),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True),
        nn.AvgPool2d(3, 2, ceil_mode=True), ResponseNorm2d(), DropSite("conv"),
        nn.Conv2d(c2, c3, 5, padding=2), nn.ReLU(inplace=True),
        nn.AvgPool2d(3, 2, ceil_mode=True), DropSite("conv"),
    )
    classifier = nn.Sequential(
        nn.Linear(c3 * side * side, hidden), nn.ReLU(inplace=True), DropSite("fc"),
        nn.Linear(hidden, info.num_classes),
    )
    model = ConvNet(features, classifier)
    model.regdrop_dropconnect_layers = ["classifier.0"]
    return model
