"""Spatial dropout - Tompson et al., "Efficient Object Localization Using Convolutional
Networks", CVPR 2015.

Drops whole channels: one Bernoulli draw per (sample, channel), broadcast over every other
axis, survivors scaled by ``1 / (1 - p)`` (inverted). Neighbouring activations of a feature
map are strongly correlated, so element-wise dropout on them mostly lowers the effective
learning rate; dropping the whole channel does regularise.

Two layouts:

* ``conv`` sites (``B x C x H x W``, any number of spatial axes): channel axis 1, what
  ``nn.Dropout1d/2d/3d`` do;
* ``token`` sites (``B x T x C``): channel axis -1, one draw per (sample, feature) shared by
  all tokens of the sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regdrop.methods.base import (
    DropModule,
    SurgeryReport,
    check_choice,
    check_rate,
    feature_axis,
    fill_sites,
    keep_mask,
    normalise_sites,
)
from regdrop.methods.method import Method

__all__ = ["METHOD", "SpatialDropout", "SpatialOptions", "apply_spatial_dropout", "spatial_dropout"]

# The kinds of site whose activations have channels (where: the site's feature axis).
SPATIAL_KINDS = ("conv", "token")


def spatial_dropout(
    x: torch.Tensor, rate: torch.Tensor | float, training: bool = True, channel_axis: int = 1
) -> torch.Tensor:
    """Spatial (channel-wise) inverted dropout of ``x``; axis 0 is the batch.

    One uniform draw per (sample, channel): the channel is kept when it is ``>= rate`` and
    then scaled by ``1 / (1 - rate)``. Rate 0 returns exactly ``x``; not training: ``x``.
    """
    if not training:
        return x
    if x.dim() < 2:
        raise ValueError(f"x must have a batch and a channel axis, got shape {tuple(x.shape)}")
    axis = channel_axis % x.dim()
    if axis == 0:
        raise ValueError(f"channel_axis must not be the batch axis 0, got {channel_axis}")
    shape = [1] * x.dim()
    shape[0], shape[axis] = x.shape[0], x.shape[axis]
    return x * keep_mask(shape, rate, x)


class SpatialDropout(DropModule):
    """Spatial dropout (Tompson et al. 2015): drops whole channels per sample.

    Args:
        p: the drop probability of a channel (the peak rate).
        channel_axis: the axis of the channels: 1 for ``B x C x ...`` feature maps, -1 for
            ``B x T x C`` tokens. Must not be 0 (the batch).
        kind: the kind of drop site the layer fills (``conv`` or ``token``).
    """

    def __init__(self, p: float = 0.1, *, channel_axis: int = 1, kind: str = "conv") -> None:
        super().__init__(p)
        if channel_axis == 0:
            raise ValueError("channel_axis must not be the batch axis 0")
        check_choice(kind, "kind", SPATIAL_KINDS)
        self.channel_axis = channel_axis
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate_is_zero():
            return x
        return spatial_dropout(x, self.rate, True, self.channel_axis)

    def extra_repr(self) -> str:
        return f"{self.rate_repr()}, channel_axis={self.channel_axis}, kind={self.kind!r}"


@dataclass
class SpatialOptions:
    """The options of spatial dropout (the keys of ``conf/dropout/spatial.yaml``)."""

    p: float = 0.1
    sites: list[str] = field(default_factory=lambda: ["conv", "token"])


def check(options: SpatialOptions) -> tuple[str, ...]:
    """Raise `ValueError` (starting with the option's name) for a bad option; needs no
    model. Returns the site kinds."""
    check_rate(options.p, "p")
    return normalise_sites(
        options.sites, valid=SPATIAL_KINDS, why="spatial dropout drops channels; fc and attn sites have none"
    )


def apply_spatial_dropout(model: nn.Module, **options: Any) -> SurgeryReport:
    """Put a `SpatialDropout(p)` at every ``conv`` and/or ``token`` drop site of ``model``
    (`SpatialOptions`: ``p=0.1, sites=("conv", "token")``).

    `DropSite("conv")` gets channel axis 1 and `DropSite("token")` channel axis -1. A plain
    ``nn.Dropout2d`` or ``nn.Dropout1d`` left in a foreign model is replaced with channel
    axis 1, torch's layout for them (``N x C x L``), so the replacement drops what the
    original dropped. ``fc`` and ``attn`` sites have no channels: asking for them is a
    `ValueError`. A model that already has spatial dropout is refused (`refuse_reapply`).
    """
    chosen = SpatialOptions(**options)
    kinds = check(chosen)

    def build(kind: str, site: nn.Module) -> SpatialDropout:
        return SpatialDropout(chosen.p, channel_axis=feature_axis(site), kind=kind)

    return fill_sites(
        model,
        kinds,
        build,
        layer_type=SpatialDropout,
        report=SurgeryReport("spatial"),
        function="apply_spatial_dropout",
    )


METHOD = Method("spatial", SpatialOptions, apply_spatial_dropout, check, example_model="resnet18")
