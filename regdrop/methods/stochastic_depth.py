"""Stochastic depth: randomly skip the residual branches of a network during training.

Two variants, chosen with ``mode``:

* ``"block"`` - Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016. One
  Bernoulli gate per residual branch per minibatch. A dropped branch is *not computed*:
  only the shortcut (with its downsampling, if any) and the block's post-activation run,
  which is where the paper's training-time saving comes from. The gates are drawn from a
  generator owned by each gate and saved in the ``state_dict``.
* ``"sample"`` - drop path as in EfficientNet, timm's ``DropPath`` and
  ``torchvision.ops.stochastic_depth(mode="row")``: a per-sample mask on the branch output,
  drawn from torch's global RNG. Every branch is computed; no compute is saved.

``scaling="inverted"`` divides a kept branch by its survival probability during training
(the network is untouched at test time); ``scaling="test_time"`` is the paper's form: the
branch is unscaled in training and multiplied by its survival probability at evaluation.

The depth profile (``distribution``) gives block ``i`` of ``N`` (0-indexed, in module
registration order) its rate:

* ``"linear"``: ``p * (i + 1) / N``, Huang et al.'s rule (block ``l = i + 1`` of ``L`` gets
  ``(l / L) * p``), identical to Composer's; the first block is already dropped.
* ``"linspace"``: ``torch.linspace(0, p, N)[i]``, i.e. ``p * i / (N - 1)``: timm's
  stochastic depth decay rule and the early-dropout paper's official code (Liu et al. 2023,
  ViT, Swin, ConvNeXt: ``linspace(0, drop_path_rate, sum(depths))``), computed with
  ``torch.linspace`` in float32 exactly as they do. The first block is never dropped, the
  last gets exactly ``p``.
* ``"uniform"``: ``p`` for every block.

(torchvision's ``p * i / N`` is a third linear rule, not offered.) Each gate is a
`DropModule` whose peak is its own depth-scaled rate, so a drop-rate schedule
(`set_rate_factor`) scales the whole profile and keeps its shape.

Supported residual blocks: torchvision ``BasicBlock`` (ResNet-18/34, CIFAR ResNets) and
``Bottleneck`` (ResNet-50+), timm ``vision_transformer.Block`` (attention and MLP branches,
independent gates at the block's rate), timm ``mlp_mixer.MixerBlock`` (token- and
channel-mixing branches, likewise), timm ``swin_transformer.SwinTransformerBlock`` (window
attention and MLP branches, likewise, as timm's ``drop_path1``/``drop_path2``) and timm
``convnext.ConvNeXtBlock`` (one branch, layer scale ``gamma`` included). Each block is
replaced by a wrapper that re-implements its forward around the *same* sub-modules under
the same attribute names, so parameter objects and ``state_dict`` keys are unchanged (the
wrapper adds only its gates). A block's own timm ``DropPath`` modules are not carried over:
the gates take their place.

Peer shortcomings fixed here (Composer 0.32): BasicBlock (ResNet-18) is supported, not
only Bottleneck; gate draws live in the ``state_dict`` (exact resume); every rank draws the
same gates (generators are seeded from ``seed``, not the rank), so DDP ranks skip the same
branches and stay in step; under data parallelism the trainer averages block mode's
gradients in one flat all-reduce (`regdrop.runtime.GradientAllReduce`) instead of DDP's
``find_unused_parameters``, since a dropped branch's parameters get no gradient. Block mode decides in Python whether
to run a branch: ``torch.compile`` breaks the graph at every gate (compile sample mode, or
run block mode eagerly), and activation checkpointing would redraw the gate on
recomputation, so do not combine block mode with it.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.models.convnext import ConvNeXtBlock
from timm.models.mlp_mixer import MixerBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block as ViTBlock
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from regdrop.methods.base import (
    DropModule,
    MethodNotApplicable,
    SurgeryReport,
    check_choice,
    check_int,
    check_rate,
    keep_mask,
    keep_scale,
    refuse_reapply,
    replace_module,
)
from regdrop.methods.method import Method
from regdrop.rng import stream_seed

Mode = Literal["block", "sample"]
Scaling = Literal["inverted", "test_time"]
Distribution = Literal["linear", "linspace", "uniform"]
MODES = ("block", "sample")
# The seed stream of this module (`regdrop.rng`): a block-mode gate's generator.
RNG_STREAMS = ("stochastic_depth.gate",)
SCALINGS = ("inverted", "test_time")
DISTRIBUTIONS = ("linear", "linspace", "uniform")


def drop_path_per_sample(x: torch.Tensor, rate: torch.Tensor | float, *,
                         inverted: bool = True) -> torch.Tensor:
    """Zero whole samples of a residual branch output ``x`` (``B x ...``) with prob. ``rate``.

    The training-time drop path of EfficientNet / timm / torchvision ``mode="row"``: one
    uniform draw per sample from torch's global RNG, kept if it is ``>= rate`` (so rate 0
    keeps everything and returns ``x`` unchanged); kept samples are scaled by
    ``1 / (1 - rate)`` when ``inverted``. The mask is drawn as `keep_mask` draws it.
    """
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * keep_mask(shape, rate, x, inverted=inverted)


def depth_rates(drop_rate: float, num_blocks: int, distribution: Distribution = "linear"
                ) -> list[float]:
    """Per-block drop rates of ``num_blocks`` blocks, deepest ``drop_rate`` (module docstring).

    "linear": ``drop_rate * (i + 1) / N`` (Huang et al., Composer); "linspace":
    ``torch.linspace(0, drop_rate, N)`` as timm and the early-dropout code compute it
    (float32 values, so the rates are bit-identical to theirs); "uniform": ``drop_rate``.
    """
    check_choice(distribution, "distribution", DISTRIBUTIONS)
    if distribution == "linear":
        return [drop_rate * block / num_blocks for block in range(1, num_blocks + 1)]
    if distribution == "linspace":
        return torch.linspace(0, drop_rate, num_blocks, device="cpu").tolist()
    return [drop_rate] * num_blocks


class BranchGate(DropModule):
    """Stochastic-depth gate of one residual branch (Huang et al. 2016 / drop path).

    A wrapper block asks `keep` whether to compute its branch (a fresh draw per training
    forward in ``mode="block"``, always True otherwise), then passes the branch output
    through the gate, which applies the per-sample mask (``mode="sample"``) and the
    scaling. ``rate`` is the drop probability in force; rate 0 is the identity in
    training, and evaluation is deterministic.
    """

    def __init__(self, peak: float, *, mode: Mode = "block", scaling: Scaling = "inverted",
                 seed: int = 0) -> None:
        super().__init__(peak)
        check_choice(mode, "mode", MODES)
        check_choice(scaling, "scaling", SCALINGS)
        self.mode = mode
        self.scaling = scaling
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        # The block-mode draw is made in place in this CPU scalar: the same stream as
        # ``torch.rand((), generator=...)``, at half its cost (no allocation per draw).
        self._uniform = torch.empty(())
        self._scale_of = (-1.0, 1.0)  # (rate, its keep_scale as a float): `_sample_mask`

    @property
    def skips_computation(self) -> bool:
        """Block mode skips dropped branches: their parameters get no gradient that step
        (the same on every data-parallel rank, whose gates draw alike)."""
        return self.mode == "block"

    def keep(self) -> bool:
        """Whether the branch is computed in this forward (draws the gate in block mode).

        Under ``torch.compile`` the draw runs eagerly (a graph break): the answer decides
        which code runs.
        """
        if not (self.training and self.mode == "block"):
            return True
        if torch.compiler.is_compiling():
            return self._draw_keep_eagerly()
        return self._draw_keep()

    def _draw_keep(self) -> bool:
        # One draw per call, even at rate 0, so the gate stream does not depend on the
        # schedule; u in [0, 1) and ``u >= 0`` always holds, so rate 0 keeps every branch.
        # Block mode decides in Python: `rate_value` reads the device only on a change.
        draw = float(self._uniform.uniform_(generator=self.generator))
        return draw >= self.rate_value()

    @torch.compiler.disable
    def _draw_keep_eagerly(self) -> bool:
        return self._draw_keep()

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.mode == "sample":
                if torch.compiler.is_compiling():
                    return drop_path_per_sample(branch, self.rate,
                                                inverted=self.scaling == "inverted")
                if self.rate_value() == 0.0:
                    return branch
                return branch * self._sample_mask(branch)
            if self.scaling == "inverted":
                rate = self.rate_value()
                return branch if rate == 0.0 else branch * (1.0 / (1.0 - rate))
            return branch
        if self.scaling == "test_time":
            return branch * (1.0 - self.rate).to(branch.dtype)
        return branch

    def _sample_mask(self, branch: torch.Tensor) -> torch.Tensor:
        """`drop_path_per_sample`'s mask, bit for bit (the same draws, the same float32
        scale), built from the mirrored Python rate: three small ops instead of nine."""
        rate = self.rate_value()
        shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
        draw_dtype = torch.promote_types(branch.dtype, torch.float32)
        mask = torch.rand(shape, dtype=draw_dtype, device=branch.device).ge_(rate)
        if self.scaling == "inverted":
            if self._scale_of[0] != rate:  # keep_scale's float32 value, once per rate
                self._scale_of = (rate, float(keep_scale(torch.tensor(rate))))
            mask.mul_(self._scale_of[1])
        return mask.to(branch.dtype)

    def residual(self, branch: torch.Tensor, shortcut: torch.Tensor, *,
                 branch_is_scratch: bool = False) -> torch.Tensor:
        """``shortcut + self(branch)``, the gated residual sum, with the fewest passes.

        ``branch_is_scratch``: the branch output may be overwritten (no backward needs it,
        as for a batch norm's output: torchvision's blocks add the shortcut into it in
        place). On the CPU the sum is then made in place, ``branch.mul_(gate).add_(shortcut)``:
        a fresh activation-sized tensor costs more there than a second pass over a warm one.
        Otherwise eager training fuses the gate into the sum: sample mode is one ``addcmul``
        (no masked copy of the branch), inverted block mode one ``add(alpha=...)``. Rate 0
        is the plain sum. Traced (``torch.compile``), evaluating, or with the shortcut in
        another dtype (autocast), it is ``shortcut + self(branch)``.
        """
        if (not self.training or torch.compiler.is_compiling()
                or shortcut.dtype != branch.dtype or shortcut.device != branch.device):
            return shortcut + self(branch)
        in_place = branch_is_scratch and branch.device.type == "cpu"
        rate = self.rate_value()
        if self.mode == "sample" and rate != 0.0:
            mask = self._sample_mask(branch)
            if in_place:
                return branch.mul_(mask).add_(shortcut)
            return torch.addcmul(shortcut, branch, mask)
        if self.mode == "block" and self.scaling == "inverted" and rate != 0.0:
            scale = 1.0 / (1.0 - rate)
            if in_place:
                return branch.mul_(scale).add_(shortcut)
            return torch.add(shortcut, branch, alpha=scale)
        return branch.add_(shortcut) if in_place else shortcut + branch

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())

    def extra_repr(self) -> str:
        return (f"{self.rate_repr('peak')}, mode={self.mode!r}, scaling={self.scaling!r}, "
                f"seed={self.seed}")


class StochasticDepthBlock(nn.Module):
    """Base of the wrappers: a residual block whose branches are guarded by `BranchGate`s."""

    def gates(self) -> list[BranchGate]:
        return [m for m in self.children() if isinstance(m, BranchGate)]


class StochasticDepthBasicBlock(StochasticDepthBlock):
    """torchvision ``BasicBlock`` with a stochastic-depth gate on its residual branch."""


    def __init__(self, block: BasicBlock, gate: BranchGate) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "conv2", "bn2"):
            self.add_module(name, getattr(block, name))
        self.downsample = block.downsample
        self.stride = block.stride
        self.gate = gate

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resnet_forward(self, x)


class StochasticDepthBottleneck(StochasticDepthBlock):
    """torchvision ``Bottleneck`` with a stochastic-depth gate on its residual branch."""


    def __init__(self, block: Bottleneck, gate: BranchGate) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"):
            self.add_module(name, getattr(block, name))
        self.downsample = block.downsample
        self.stride = block.stride
        self.gate = gate

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resnet_forward(self, x)


def _resnet_forward(block: StochasticDepthBasicBlock | StochasticDepthBottleneck,
                    x: torch.Tensor) -> torch.Tensor:
    identity = x if block.downsample is None else block.downsample(x)
    if block.gate.keep():
        # The branch ends in a batch norm, whose backward does not need its output.
        out = block.gate.residual(block.branch(x), identity, branch_is_scratch=True)
    elif block.downsample is None:
        # torchvision's ReLU is in place: never let it overwrite the block's input (an
        # out-of-place ReLU is one pass, a copy and an in-place ReLU two).
        return torch.relu(identity) if isinstance(block.relu, nn.ReLU) else block.relu(identity.clone())
    else:
        out = identity
    return block.relu(out)


class StochasticDepthViTBlock(StochasticDepthBlock):
    """timm ViT ``Block`` with independent gates on its attention and MLP branches."""


    def __init__(self, block: nn.Module, gate_attn: BranchGate, gate_mlp: BranchGate) -> None:
        super().__init__()
        for name in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2"):
            self.add_module(name, getattr(block, name))
        self.gate_attn = gate_attn
        self.gate_mlp = gate_mlp

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        # Pass the mask arguments only when given, as timm's own blocks do not all take them.
        kwargs: dict[str, Any] = {}
        if attn_mask is not None or is_causal:
            kwargs = {"attn_mask": attn_mask, "is_causal": is_causal}
        if self.gate_attn.keep():
            x = self.gate_attn.residual(self.ls1(self.attn(self.norm1(x), **kwargs)), x)
        if self.gate_mlp.keep():
            x = self.gate_mlp.residual(self.ls2(self.mlp(self.norm2(x))), x)
        return x


class StochasticDepthMixerBlock(StochasticDepthBlock):
    """timm ``MixerBlock`` with independent gates on its token- and channel-mixing branches.

    timm's block shares one ``DropPath`` module between both branches; here each branch
    has its own gate (both at the block's rate).
    """


    def __init__(self, block: nn.Module, gate_tokens: BranchGate,
                 gate_channels: BranchGate) -> None:
        super().__init__()
        for name in ("norm1", "mlp_tokens", "norm2", "mlp_channels"):
            self.add_module(name, getattr(block, name))
        self.gate_tokens = gate_tokens
        self.gate_channels = gate_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_tokens.keep():
            mixed = self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
            x = self.gate_tokens.residual(mixed, x)
        if self.gate_channels.keep():
            x = self.gate_channels.residual(self.mlp_channels(self.norm2(x)), x)
        return x


class StochasticDepthSwinBlock(StochasticDepthBlock):
    """timm ``SwinTransformerBlock`` with independent gates on its (shifted) window
    attention and MLP branches, as timm's ``drop_path1`` and ``drop_path2``.

    The window partition, cyclic shift, padding and attention mask are timm's own code
    (``_attn`` and the window helpers are borrowed from timm's class), run on the block's
    own window settings and mask buffer, which are carried over; so is
    ``set_input_size``, which a timm Swin stage calls on its blocks when the input size
    changes.
    """

    # Plain attributes timm's window code reads; the mask buffer is carried separately.
    WINDOW_ATTRIBUTES = ("dim", "input_resolution", "target_shift_size", "always_partition",
                         "dynamic_mask", "window_size", "shift_size", "window_area",
                         "mlp_ratio")
    _attn = SwinTransformerBlock._attn
    get_attn_mask = SwinTransformerBlock.get_attn_mask
    _calc_window_shift = SwinTransformerBlock._calc_window_shift
    set_input_size = SwinTransformerBlock.set_input_size
    _init_buffers = SwinTransformerBlock._init_buffers
    init_non_persistent_buffers = SwinTransformerBlock.init_non_persistent_buffers

    def __init__(self, block: nn.Module, gate_attn: BranchGate, gate_mlp: BranchGate) -> None:
        super().__init__()
        for name in ("norm1", "attn", "norm2", "mlp"):
            self.add_module(name, getattr(block, name))
        for name in self.WINDOW_ATTRIBUTES:
            setattr(self, name, getattr(block, name))
        # Not persistent, as in timm: rebuilt from the window settings, never saved.
        self.register_buffer("attn_mask", block.attn_mask, persistent=False)
        self.gate_attn = gate_attn
        self.gate_mlp = gate_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        if self.gate_attn.keep():
            x = x + self.gate_attn(self._attn(self.norm1(x)))
        x = x.reshape(batch, -1, channels)
        if self.gate_mlp.keep():
            x = x + self.gate_mlp(self.mlp(self.norm2(x)))
        return x.reshape(batch, height, width, channels)


class StochasticDepthConvNeXtBlock(StochasticDepthBlock):
    """timm ``ConvNeXtBlock`` with a gate on its one residual branch.

    The branch is depthwise conv, norm, MLP and the layer scale ``gamma`` (the same
    parameter, or None); the shortcut (identity, or timm's ``Downsample``) always runs.
    """

    def __init__(self, block: nn.Module, gate: BranchGate) -> None:
        super().__init__()
        for name in ("conv_dw", "norm", "mlp", "shortcut"):
            self.add_module(name, getattr(block, name))
        self.register_parameter("gamma", block.gamma)
        self.use_conv_mlp = block.use_conv_mlp
        self.gate = gate

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:  # channels-last MLP, as timm runs it
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        if self.gate.keep():
            return self.gate(self.branch(x)) + shortcut
        return shortcut


# Exact types, not isinstance: a subclass may have a different forward.
_WRAPPERS: dict[type[nn.Module], tuple[type[StochasticDepthBlock], int]] = {
    BasicBlock: (StochasticDepthBasicBlock, 1),
    Bottleneck: (StochasticDepthBottleneck, 1),
    ViTBlock: (StochasticDepthViTBlock, 2),
    MixerBlock: (StochasticDepthMixerBlock, 2),
    SwinTransformerBlock: (StochasticDepthSwinBlock, 2),
    ConvNeXtBlock: (StochasticDepthConvNeXtBlock, 1),
}

SUPPORTED_BLOCKS = (
    "torchvision.models.resnet.BasicBlock",
    "torchvision.models.resnet.Bottleneck",
    "timm.models.vision_transformer.Block",
    "timm.models.mlp_mixer.MixerBlock",
    "timm.models.swin_transformer.SwinTransformerBlock",
    "timm.models.convnext.ConvNeXtBlock",
)


@dataclass
class StochasticDepthOptions:
    """The options of stochastic depth (the keys of ``conf/dropout/stochastic_depth.yaml``).

    ``drop_rate`` is the old name of ``p``, kept as a deprecated alias (null: not given).
    """

    p: float | None = 0.1  # null in a config: the model's recommendation (Liu et al.'s rates)
    mode: str = "block"
    distribution: str = "linear"
    scaling: str = "inverted"
    seed: int | None = None  # null: the run's seed (0 in the functional API)
    drop_rate: float | None = None


def check(options: StochasticDepthOptions) -> None:
    """Raise `ValueError` (starting with the option's name) for a bad option; needs no model."""
    check_rate(options.p, "p")
    check_choice(options.mode, "mode", MODES)
    check_choice(options.distribution, "distribution", DISTRIBUTIONS)
    check_choice(options.scaling, "scaling", SCALINGS)
    if options.seed is not None:
        check_int(options.seed, "seed")


def apply_stochastic_depth(model: nn.Module, **options: Any) -> SurgeryReport:
    """Wrap every supported residual block of ``model`` with stochastic-depth gates, in place
    (`StochasticDepthOptions`: ``p=0.1, mode="block", distribution="linear",
    scaling="inverted", seed=0``).

    ``p`` is the rate of the deepest block (``distribution="linear"``, block ``l``
    of ``L`` gets ``(l / L) * p``; ``"linspace"``, timm's and the early-dropout
    code's ``linspace(0, p, L)``) or of every block (``"uniform"``). Huang et al.
    use block mode with ``p=0.5``, linear, on CIFAR ResNets; Composer's card
    suggests 0.1, linear, for ResNet-50/101 on ImageNet; Liu et al. use sample mode,
    linspace (0.5 for early s.d.). ``seed`` seeds the block-mode gate generators.
    ``drop_rate``, the old name of ``p``, still works with a deprecation warning.

    Raises `MethodNotApplicable` if the model has no supported residual block; a model
    that already has stochastic depth is refused (`refuse_reapply`).
    """
    chosen = StochasticDepthOptions(**rename_drop_rate(options))
    check(chosen)
    drop_rate, mode, distribution, scaling = chosen.p, chosen.mode, chosen.distribution, chosen.scaling
    seed = chosen.seed or 0
    refuse_reapply(model, StochasticDepthBlock, "apply_stochastic_depth")

    if type(model) in _WRAPPERS:
        raise ValueError("model: is itself a residual block; apply stochastic depth to a "
                         "network that contains it")
    blocks = [(n, m) for n, m in model.named_modules() if type(m) in _WRAPPERS]
    if not blocks:
        raise MethodNotApplicable(
            f"stochastic depth needs residual blocks, and {type(model).__name__} has none "
            f"of the supported types ({', '.join(SUPPORTED_BLOCKS)}). It skips residual "
            "branches, so it cannot apply to a plain feed-forward network such as LeNet or "
            "AlexNet; use a ResNet or a timm ViT, MLP-Mixer, Swin or ConvNeXt.")

    report = SurgeryReport("stochastic_depth")
    rates = depth_rates(drop_rate, len(blocks), distribution)
    gate_seeds = (stream_seed(seed, "stochastic_depth.gate", k) for k in itertools.count())  # gate k, module order
    for (name, block), rate in zip(blocks, rates, strict=True):
        wrapper_type, gates_per_block = _WRAPPERS[type(block)]
        gates = [BranchGate(rate, mode=mode, scaling=scaling, seed=next(gate_seeds))
                 for _ in range(gates_per_block)]
        wrapper = wrapper_type(block, *gates)
        replace_module(model, name, wrapper)
        report.add(name, block, wrapper)
    return report


def rename_drop_rate(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the deprecated ``drop_rate`` moved to ``p`` (one warning)."""
    options = dict(options)
    old = options.pop("drop_rate", None)
    if old is not None:
        warnings.warn("dropout.drop_rate is deprecated: it is stochastic depth's p, the name every "
                      "method gives its rate; use dropout.p", FutureWarning, stacklevel=3)
        options["p"] = old
    return options


METHOD = Method("stochastic_depth", StochasticDepthOptions, apply_stochastic_depth, check,
                recommendable=frozenset({"p"}), aliases={"drop_rate": "p"}, example_model="resnet18")
