"""DropBlock - Ghiasi, Lin and Le, "DropBlock: A regularization method for convolutional
networks", NeurIPS 2018.

Drops contiguous ``block_size x block_size`` regions of conv feature maps: dropping single
units (dropout) barely regularises a conv layer, whose neighbouring units carry the same
information; dropping a whole region does. The paper's Algorithm 1, per ``B x C x H x W``
feature map:

1. Draw the seeds: each unit is a seed with probability ``gamma``, drawn only where a whole
   block fits inside the map (the paper's "shaded green region"), so every block is whole.
2. Zero the ``block_size x block_size`` square of every seed (squares may overlap).
3. Rescale by ``count(M) / count_ones(M)``: the mask's size over its kept units.

``gamma`` turns the drop rate ``p = 1 - keep_prob`` into a seed rate (the paper's formula;
for a non-square map ``feat_size^2`` is ``H * W`` and ``(feat_size - block_size + 1)^2``
is ``(H - block_size + 1) * (W - block_size + 1)``, the size of the seed region)::

    gamma = p / block_size^2 * feat_size^2 / (feat_size - block_size + 1)^2

so that ``gamma * block_size^2`` seeds' worth of units cover a fraction ``p`` of the map
(overlapping blocks make the dropped fraction slightly smaller than ``p``; the tests
measure it). Evaluation is the identity. The paper ramps ``keep_prob`` linearly from 1 to
its target over training; in regdrop that is the warm-up schedule
(``schedule=warmup``), which moves the layer's rate in force, and ``gamma`` is computed
from the rate in force at every forward.

Choices, and where they come from (the paper's text and its reference implementation,
``dropblock`` in tensorflow/tpu's ``models/official/resnet/resnet_model.py``):

* One mask per channel (Algorithm 1; the paper reports it works better than a mask shared
  by the channels), ``share_channels=True`` for the shared one. timm's ``drop_block_2d``
  defaults to the shared mask (``couple_channels=True``) and calls that the paper's.
* The rescale counts the whole batch tensor, as the reference implementation does
  (``scale_per="batch"``); ``scale_per="sample"`` counts each sample's ``C x H x W``.
  Everything dropped gives zeros, not NaN.
* A map smaller than the block: the block is cut to the map, per axis (the reference
  implementation's ``min(dropblock_size, width)``, and timm's), so a ``block_size`` at
  least the map's size drops whole maps with probability ``p``.

Why not timm's ``drop_block_2d``: it draws seeds everywhere, padding the max-pool, so a
block at the border is cut off and covers less than ``block_size^2`` units (Algorithm 1
draws seeds only where a whole block fits); it draws the seeds in the data's dtype (coarse
half-precision uniforms bias ``gamma``); and it takes the rate as a Python float, while a
regdrop layer holds its rate in force in a tensor that a schedule moves without
recompiling. The math here is a few tensor operations (uniform draws compared with
``gamma``, a padded max-pool that grows each seed into its block), in regdrop's pure-
function style.

Where it is installed (`apply_dropblock`):

* Models with torchvision ``BasicBlock``/``Bottleneck`` residual blocks (the ResNets):
  inside every block of the chosen ``stages`` (``layer3`` and ``layer4`` by default, the
  paper's groups 3 and 4 of ResNet-50, where timm's ResNet puts it too), after each
  conv's batch norm (``bnK`` becomes ``Sequential(bnK, DropBlock2d)``) and on the
  projection shortcut (``downsample``), as the reference implementation does. As there
  too, a stage's rate falls by ``stage_decay`` per stage before the model's last:
  ``p / stage_decay^(last - stage)`` (its ``1 - (1 - keep_prob) / 4^(4 - group)``: group 4
  at ``p``, group 3 at ``p / 4``); ``stage_decay=1`` gives every stage ``p``. Its block
  applies DropBlock after the ReLU that follows a batch norm; a DropBlock mask is ``>= 0``,
  so ``relu(mask * x) == mask * relu(x)`` and placing it before torchvision's ReLU is the
  same. The stage-end ``conv`` drop sites of regdrop's ResNets stay empty.
* Any other model: every ``conv`` drop site (`DropSite("conv")`, or a plain
  ``nn.Dropout2d``), e.g. LeNet's, VGG's and cuda-convnet's.

Randomness: torch's global generator (which checkpoints save and restore, and the run's
seed sets), so the run's seed changes the masks and a resumed run draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from regdrop.methods.base import (
    DropModule,
    MethodNotApplicable,
    SurgeryReport,
    check_choice,
    check_int,
    check_rate,
    fill_sites,
    refuse_reapply,
    replace_module,
)
from regdrop.methods.method import Method

__all__ = ["METHOD", "DropBlock2d", "DropBlockOptions", "apply_dropblock", "block_seeds",
           "blocks_from_seeds", "drop_block", "seed_rate"]

SCALE_PER = ("batch", "sample")
# The batch norms of a torchvision residual block, each followed by DropBlock.
_BLOCK_NORMS = {BasicBlock: ("bn1", "bn2"), Bottleneck: ("bn1", "bn2", "bn3")}


def block_shape(height: int, width: int, block_size: int) -> tuple[int, int]:
    """The block on an ``height x width`` map: ``block_size`` cut to the map, per axis."""
    return min(block_size, height), min(block_size, width)


def seed_rate(rate: torch.Tensor | float, height: int, width: int, block_size: int) -> torch.Tensor:
    """``gamma``, the probability that a unit of the seed region is a seed (module docstring),
    for drop rate ``rate`` on an ``height x width`` map, as a float32 tensor."""
    block_h, block_w = block_shape(height, width, block_size)
    seed_region = (height - block_h + 1) * (width - block_w + 1)
    rate = torch.as_tensor(rate, dtype=torch.float32)
    return rate * (height * width) / (block_h * block_w * seed_region)


def block_seeds(x: torch.Tensor, rate: torch.Tensor | float, block_size: int, *,
                share_channels: bool = False) -> torch.Tensor:
    """The seeds of a DropBlock mask for ``x`` (``B x C x H x W``): 1 at a seed, else 0.

    Drawn only on the seed region, the ``(H - bh + 1) x (W - bw + 1)`` top-left corners of
    the blocks that fit inside the map (Algorithm 1's valid centres), one uniform draw per
    unit from torch's global generator, a seed where it is ``< gamma`` (so rate 0 draws no
    seed). Shape ``B x C' x (H - bh + 1) x (W - bw + 1)`` with ``C' = 1`` when the channels
    share the mask. The draws are float32 (float64 for float64 data), whatever ``x``'s dtype.
    """
    batch, channels, height, width = x.shape
    block_h, block_w = block_shape(height, width, block_size)
    gamma = seed_rate(rate, height, width, block_size).to(x.device)
    draw_dtype = torch.promote_types(x.dtype, torch.float32)
    shape = (batch, 1 if share_channels else channels, height - block_h + 1, width - block_w + 1)
    return torch.rand(shape, dtype=draw_dtype, device=x.device).lt_(gamma)


def blocks_from_seeds(seeds: torch.Tensor, block_h: int, block_w: int) -> torch.Tensor:
    """The dropped units (1) of the blocks grown from ``seeds``: the seed at ``(i, j)`` of the
    seed region drops ``[i, i + block_h) x [j, j + block_w)`` of the map. A max-pool over the
    seeds padded by the block's size minus one, so the map is ``block_h - 1`` and
    ``block_w - 1`` units larger than the seed region."""
    padded = F.pad(seeds.to(torch.float32), (block_w - 1, block_w - 1, block_h - 1, block_h - 1))
    return F.max_pool2d(padded, (block_h, block_w), stride=1)


def drop_block(x: torch.Tensor, rate: torch.Tensor | float, block_size: int = 7,
               training: bool = True, *, share_channels: bool = False,
               scale_per: str = "batch") -> torch.Tensor:
    """DropBlock of ``x`` (``B x C x H x W``) at drop rate ``rate`` (``1 - keep_prob``).

    Training: zeroes the ``block_size x block_size`` blocks of `block_seeds` (`blocks_from_seeds`)
    and scales the rest by ``count / count_ones`` of the keep mask, counted over the whole
    tensor (``scale_per="batch"``) or per sample (``"sample"``); a count with no kept unit
    gives zeros. Rate 0 returns exactly ``x`` (``x * 1.0``). Not training: ``x``.
    """
    if not training:
        return x
    if x.dim() != 4:
        raise ValueError(f"x must be a B x C x H x W feature map, got shape {tuple(x.shape)}")
    check_choice(scale_per, "scale_per", SCALE_PER)
    block_h, block_w = block_shape(x.shape[2], x.shape[3], block_size)
    seeds = block_seeds(x, rate, block_size, share_channels=share_channels)
    keep = 1.0 - blocks_from_seeds(seeds, block_h, block_w)
    axes = None if scale_per == "batch" else (1, 2, 3)
    kept = keep.sum() if axes is None else keep.sum(dim=axes, keepdim=True)
    size = keep.numel() if axes is None else keep[0].numel()
    # count / count_ones, and 0 where nothing is kept (no 0 * inf NaN).
    scale = torch.where(kept > 0, size / kept.clamp_min(1.0), torch.zeros_like(kept))
    return x * (keep * scale).to(x.dtype)


class DropBlock2d(DropModule):
    """DropBlock (Ghiasi et al. 2018) on ``B x C x H x W`` feature maps.

    Args:
        p: the drop rate ``1 - keep_prob`` (the peak rate; a schedule scales the rate in
            force, and ``gamma`` follows it).
        block_size: the side of the dropped squares (cut to the map where it is smaller).
        share_channels: one mask for all channels of a sample (default: one per channel,
            the paper's Algorithm 1).
        scale_per: count the rescale over the whole ``"batch"`` tensor (the paper's
            implementation) or per ``"sample"``.
    """

    kind = "conv"

    def __init__(self, p: float = 0.1, *, block_size: int = 7, share_channels: bool = False,
                 scale_per: str = "batch") -> None:
        super().__init__(p)
        check_int(block_size, "block_size", positive=True)
        check_choice(scale_per, "scale_per", SCALE_PER)
        self.block_size = int(block_size)
        self.share_channels = bool(share_channels)
        self.scale_per = scale_per

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate_is_zero():
            return x
        return drop_block(x, self.rate, self.block_size, True,
                          share_channels=self.share_channels, scale_per=self.scale_per)

    def extra_repr(self) -> str:
        return (f"{self.rate_repr()}, block_size={self.block_size}, "
                f"share_channels={self.share_channels}, scale_per={self.scale_per!r}")


@dataclass
class DropBlockOptions:
    """The options of DropBlock (the keys of ``conf/dropout/dropblock.yaml``)."""

    p: float = 0.1  # 1 - keep_prob; the paper's ResNet-50 target keep_prob is 0.9
    block_size: int = 7
    stages: list[int] = field(default_factory=lambda: [3, 4])  # ResNet groups (layerN)
    stage_decay: float = 4.0  # a stage's rate is p / stage_decay^(last stage - stage)
    share_channels: bool = False
    scale_per: str = "batch"


def check(options: DropBlockOptions) -> None:
    """Raise `ValueError` (starting with the option's name) for a bad option; needs no model."""
    check_rate(options.p, "p")
    check_int(options.block_size, "block_size", positive=True)
    stages = list(options.stages)
    if not stages or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in stages):
        raise ValueError(f"stages must name at least one ResNet stage number (1 = layer1), got {stages!r}")
    if not (isinstance(options.stage_decay, int | float) and not isinstance(options.stage_decay, bool)
            and options.stage_decay >= 1):
        raise ValueError(f"stage_decay must be a number >= 1 (1: every stage at p), got {options.stage_decay!r}")
    if not isinstance(options.share_channels, bool):
        raise ValueError(f"share_channels must be true or false, got {options.share_channels!r}")
    check_choice(options.scale_per, "scale_per", SCALE_PER)


def apply_dropblock(model: nn.Module, **options: Any) -> SurgeryReport:
    """Install `DropBlock2d` layers in ``model`` (`DropBlockOptions`: ``p=0.1,
    block_size=7, stages=(3, 4), stage_decay=4, share_channels=False, scale_per="batch"``).

    A model with torchvision residual blocks gets a layer after every batch norm of the
    blocks in ``stages`` (``layer3``, ``layer4``: the paper's groups 3 and 4) and on their
    projection shortcuts; any other model fills its ``conv`` drop sites (module docstring).
    Raises `MethodNotApplicable` when there is nowhere to put it; a model that already has
    DropBlock is refused (`refuse_reapply`).
    """
    chosen = DropBlockOptions(**options)
    check(chosen)

    def build(*_: Any, rate: float = chosen.p) -> DropBlock2d:
        return DropBlock2d(rate, block_size=chosen.block_size,
                           share_channels=chosen.share_channels, scale_per=chosen.scale_per)

    report = SurgeryReport("dropblock")
    blocks = [(name, m) for name, m in model.named_modules() if type(m) in _BLOCK_NORMS]
    if not blocks:
        return fill_sites(model, ("conv",), build, layer_type=DropBlock2d, report=report,
                          function="apply_dropblock")
    refuse_reapply(model, DropBlock2d, "apply_dropblock")
    stage_names = {f"layer{stage}" for stage in chosen.stages}
    chosen_blocks = [(name, m) for name, m in blocks if name.split(".", 1)[0] in stage_names]
    if not chosen_blocks:
        present = sorted({name.split(".", 1)[0] for name, _ in blocks})
        raise MethodNotApplicable(
            f"apply_dropblock: stages {list(chosen.stages)} name no residual stage of "
            f"{type(model).__name__}, whose residual blocks are in {present}; set "
            "dropout.stages to stage numbers it has (1 = layer1).")
    last = max(_stage(name) for name, _ in blocks)
    for name, block in chosen_blocks:
        rate = chosen.p / chosen.stage_decay ** (last - _stage(name))
        for norm in _BLOCK_NORMS[type(block)]:
            _follow_with(model, f"{name}.{norm}", build(rate=rate), report)
        if block.downsample is not None:
            _follow_with(model, f"{name}.downsample", build(rate=rate), report)
    return report


def _stage(block_name: str) -> int:
    """The stage number of a ResNet block called ``layerN.<i>`` (0 outside a ``layerN``)."""
    top = block_name.split(".", 1)[0]
    return int(top[5:]) if top.startswith("layer") and top[5:].isdigit() else 0


def _follow_with(model: nn.Module, name: str, layer: DropBlock2d, report: SurgeryReport) -> None:
    """Make the module ``name`` run ``layer`` after itself: appended to a ``Sequential`` (its
    keys unchanged), else ``Sequential(module, layer)``."""
    module = model.get_submodule(name)
    if type(module) is nn.Sequential:
        module.append(layer)
        report.add(f"{name}.{len(module) - 1}", "nothing (appended)", layer)
        return
    replace_module(model, name, nn.Sequential(module, layer))
    report.add(name, module, f"Sequential({type(module).__name__}, DropBlock2d)")


METHOD = Method("dropblock", DropBlockOptions, apply_dropblock, check, example_model="resnet18")
