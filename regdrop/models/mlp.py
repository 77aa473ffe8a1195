"""The fully connected MNIST network of the DropConnect paper (Wan et al., ICML 2013).

Wan et al. compare no-drop, dropout and DropConnect on MNIST with fully connected
networks of two hidden layers: their Table 2 uses a 784-800-800-10 network with ReLU,
sigmoid or tanh units (no data augmentation), their Figure 2 varies the hidden layers'
size (overfitting as the layers grow) and, for the drop-rate study, uses 400-400 hidden
units. ``hidden`` gives the hidden sizes (default ``[800, 800]``, Table 2) and
``activation`` the unit (``relu`` default, ``tanh``, ``sigmoid``); the input is the
flattened image, so any image size and channel count works.

Each hidden layer is ``Linear``, activation, then an ``fc`` drop site (where dropout
drops units). DropConnect masks the weights of every hidden layer
(``regdrop_dropconnect_layers``), not the classifier's; its Gaussian inference finds the
activation right after each layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    """Flatten, then ``Linear``-activation-site per hidden layer, then the classifier."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int,
                 activation: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation](), DropSite("fc")]
            in_features = width
        self.layers = nn.Sequential(*layers, nn.Linear(in_features, num_classes))
        # The hidden Linear layers: every third module from the first.
        self.regdrop_dropconnect_layers = [f"layers.{3 * i}" for i in range(len(hidden))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


def build_mlp(info: DataInfo, hidden: Sequence[int] = (800, 800), activation: str = "relu") -> MLP:
    hidden = list(hidden)
    if not hidden or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in hidden):
        raise ValueError(f"hidden must list at least one positive layer width, got {hidden}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return MLP(info.channels * info.image_size**2, hidden, info.num_classes, activation)
