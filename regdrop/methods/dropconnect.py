"""DropConnect - Wan et al., "Regularization of Neural Networks using DropConnect", ICML 2013.

DropConnect masks weights instead of activations: a layer computes ``r = a((M * W) v)``
with a Bernoulli mask ``M`` on the weights (and here on the bias too, the weight of a
constant input). regdrop uses inverted scaling: kept weights are multiplied by
``1 / (1 - p)``, so the expected pre-activation is the plain ``W v + b``.

Masks (``per``):

* ``"batch"`` (default): one mask for the whole minibatch, ``F.linear`` with the masked
  weight; the common practical variant, as cheap as the plain layer plus one mask.
* ``"example"``: a fresh mask per example, as in the paper; a batched matmul over
  ``B x out x in`` masked weights. Memory: the masked weights and the masks are kept for the
  backward pass, about ``3 * B * out * in`` elements (B=256, 1024x1024: ~3 GiB in float32).
* ``"subbatch"``: the batch is cut into ``groups`` contiguous sub-batches (sizes differ by
  at most one; fewer groups when the batch is smaller), one mask each: ``groups`` times
  the mask memory of ``"batch"``, with more mask diversity per step.

Inference (``inference``):

* ``"mean"``: the plain layer, ``a(W v + b)``: the exact expected pre-activation under
  inverted scaling (the paper's "mean inference" ``a(p W v)`` for its keep rate ``p``).
* ``"gaussian"``: the paper's inference. Each pre-activation is moment-matched to
  ``u ~ N(W v + b, p/(1-p) ((W*W)(v*v) + b*b))`` and ``a(u)`` is averaged over ``samples``
  draws (1000 in the paper). The standard normal draws are fixed, made from ``seed`` when
  the layer is built (antithetic pairs ``eps, -eps``, independent per output unit, shared by
  all examples), so evaluation is deterministic and an example's output does not depend on
  the rest of its batch.

The activation ``a`` is part of the layer, as in the paper. `apply_dropconnect` with
gaussian inference moves the activation module that follows the Linear in its parent
``nn.Sequential`` into the layer and leaves an ``nn.Identity`` in its place: applying a
GELU (say) again to the averaged ``E[gelu(u)]`` would be wrong. For a ReLU leaving it would
have been harmless (``E[relu(u)] >= 0`` and ReLU is idempotent there), but every activation
is handled the same way. With mean inference nothing but the Linear changes.

State dict: the layer reuses the Linear's ``weight`` and ``bias`` Parameters, so their keys
(``<name>.weight``, ``<name>.bias``) and the optimizer's references stay the same; it adds
the ``<name>.rate`` buffer. The gaussian draws are not saved: they follow from ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regdrop.methods.base import (
    DropModule,
    MethodNotApplicable,
    SurgeryReport,
    check_choice,
    check_int,
    check_rate,
    keep_mask,
    refuse_reapply,
    replace_module,
)
from regdrop.methods.method import Method
from regdrop.rng import stream_seed

__all__ = ["METHOD", "DropConnectLinear", "DropConnectOptions", "apply_dropconnect", "normal_draws"]

PER = ("batch", "example", "subbatch")
# The seed stream of this module (`regdrop.rng`): a layer's gaussian inference draws.
RNG_STREAMS = ("dropconnect.site",)
INFERENCE = ("mean", "gaussian")
# Element-wise, parameter-free activations that gaussian inference can average.
ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
)
# Gaussian inference evaluates ``samples x rows x out`` activations in chunks of this size.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class DropConnectOptions:
    """The options of DropConnect (the keys of ``conf/dropout/dropconnect.yaml``)."""

    p: float = 0.5
    layers: list[str] | None = None
    per: str = "batch"
    groups: int = 4
    inference: str = "mean"
    samples: int = 1000
    seed: int | None = None  # null: the run's seed (0 in the functional API)


def check(options: DropConnectOptions) -> None:
    """Raise `ValueError` (starting with the option's name) for a bad option; needs no model
    (whether ``layers`` name Linear layers is checked on the model)."""
    layers = options.layers
    check_rate(options.p, "p")
    if layers is not None and not (
        isinstance(layers, str) or all(isinstance(name, str) for name in layers)
    ):
        raise ValueError(f"layers must be dotted layer names or null, got {layers!r}")
    check_choice(options.per, "per", PER)
    check_int(options.groups, "groups", positive=True)
    check_choice(options.inference, "inference", INFERENCE)
    check_int(options.samples, "samples", positive=True)
    if options.seed is not None:
        check_int(options.seed, "seed")


def normal_draws(samples: int, width: int, seed: int) -> torch.Tensor:
    """``samples x width`` standard normal draws from ``seed``, in antithetic pairs."""
    generator = torch.Generator().manual_seed(seed)
    half = torch.randn((samples + 1) // 2, width, generator=generator)
    return torch.cat([half, -half])[:samples]


class DropConnectLinear(DropModule):
    """DropConnect (Wan et al. 2013) on an existing ``nn.Linear``, with inverted scaling.

    Args:
        linear: the layer to mask; its ``weight`` and ``bias`` Parameters are reused.
        p: the probability of dropping a weight (the peak rate).
        per: ``"batch"``, ``"example"`` or ``"subbatch"``: who shares a mask (module doc).
        groups: the number of sub-batches for ``per="subbatch"``.
        inference: ``"mean"`` or ``"gaussian"`` (module doc).
        samples: the number of draws per pre-activation for gaussian inference.
        seed: the seed of the gaussian inference draws.
        activation: the element-wise activation that is part of the layer (None: none).

    Masks are drawn from torch's global generator (the trainer seeds it; checkpoints are to come).
    """

    normal_draws: torch.Tensor | None

    def __init__(
        self,
        linear: nn.Linear,
        p: float = 0.5,
        *,
        per: str = "batch",
        groups: int = 4,
        inference: str = "mean",
        samples: int = 1000,
        seed: int = 0,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__(p)
        check(DropConnectOptions(p=p, per=per, groups=groups, inference=inference, samples=samples, seed=seed))
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if activation is not None and not isinstance(activation, ACTIVATIONS):
            raise ValueError(f"activation must be one of {[a.__name__ for a in ACTIVATIONS]} or None")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.per, self.groups, self.inference = per, groups, inference
        self.samples, self.seed = samples, seed
        self.activation = activation
        draws = None
        if inference == "gaussian":
            draws = normal_draws(samples, self.out_features, seed).to(self.weight.device)
        self.register_buffer("normal_draws", draws, persistent=False)

    def hyper_parameters(self) -> dict[str, object]:
        return {
            "p": self.peak, "per": self.per, "groups": self.groups,
            "inference": self.inference, "samples": self.samples,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if self.inference == "gaussian" and self.activation is not None and not self.rate_is_zero():
                return self._gaussian_inference(x)
            out = F.linear(x, self.weight, self.bias)
        elif self.rate_is_zero():
            out = F.linear(x, self.weight, self.bias)
        elif self.per == "batch" or x.dim() < 2:
            out = F.linear(x, *self._masked(()))
        elif self.per == "example":
            out = self._per_example(x)
        else:
            out = self._per_subbatch(x)
        return out if self.activation is None else self.activation(out)

    def _masked(self, prefix: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked, rescaled weight and bias, with ``prefix`` independent masks stacked first."""
        weight = self.weight * keep_mask((*prefix, *self.weight.shape), self.rate, self.weight)
        bias = self.bias
        if bias is not None:
            bias = bias * keep_mask((*prefix, *bias.shape), self.rate, bias)
        return weight, bias

    def _per_example(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        weight, bias = self._masked((batch,))
        rows = x.reshape(batch, -1, self.in_features)
        if bias is None:
            out = torch.bmm(rows, weight.transpose(1, 2))
        else:
            out = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.out_features)

    def _per_subbatch(self, x: torch.Tensor) -> torch.Tensor:
        groups = min(self.groups, x.shape[0])
        weight, bias = self._masked((groups,))
        chunks = x.tensor_split(groups)
        outs = [
            F.linear(chunk, weight[g], None if bias is None else bias[g])
            for g, chunk in enumerate(chunks)
        ]
        return torch.cat(outs)

    def _gaussian_inference(self, x: torch.Tensor) -> torch.Tensor:
        """``E[a(u)]``, ``u`` the moment-matched Gaussian pre-activation, by fixed draws."""
        assert self.activation is not None and self.normal_draws is not None
        mean = F.linear(x, self.weight, self.bias)
        square_bias = None if self.bias is None else self.bias * self.bias
        spread = F.linear(x * x, self.weight * self.weight, square_bias)
        variance = spread.float() * (self.rate / (1.0 - self.rate))
        std = variance.clamp_min(0.0).sqrt().reshape(-1, self.out_features)
        centre = mean.float().reshape(-1, self.out_features)
        draws = self.normal_draws.float()
        step = max(1, CHUNK_ELEMENTS // max(1, centre.numel()))
        total = torch.zeros_like(centre)
        for start in range(0, self.samples, step):
            eps = draws[start : start + step].unsqueeze(1)
            total += self.activation(centre + std * eps).sum(0)
        return (total / self.samples).to(mean.dtype).reshape(mean.shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.rate_repr()}, per={self.per!r}, "
            f"groups={self.groups}, inference={self.inference!r}, samples={self.samples}, "
            f"seed={self.seed}"
        )


def _attention_owned(model: nn.Module) -> set[str]:
    """Names of Linear layers inside ``nn.MultiheadAttention``, which reads their weights
    directly instead of calling them, so a DropConnect layer there would never act."""
    owned = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            owned.update(f"{prefix}{child}" for child, _ in module.named_modules() if child)
    return owned


def _chosen_layers(model: nn.Module, layers: Iterable[str] | str | None) -> list[str]:
    """The dotted names of the Linear layers ``apply_dropconnect`` should mask."""
    owned = _attention_owned(model)
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, DropConnectLinear)
        or (isinstance(module, nn.Linear) and name not in owned)
    ]
    if not candidates:
        raise MethodNotApplicable(
            f"apply_dropconnect found no nn.Linear layer in {type(model).__name__} (layers "
            "inside nn.MultiheadAttention do not count: it reads their weights directly). "
            "DropConnect masks the weights of fully connected layers, usually the large hidden "
            "FC layer before the classifier; use it on a model with such a layer, or pick "
            "a method that works on activations (standard, spatial)."
        )
    if layers is None:
        declared = getattr(model, "regdrop_dropconnect_layers", None)
        if declared is None:
            return candidates[:-1] or candidates
        layers = declared
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not names:
        raise ValueError("layers must name at least one nn.Linear, got an empty list")
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layers: no module named {name!r} in {type(model).__name__}") from None
        if name in owned:
            raise ValueError(
                f"layers: {name!r} belongs to an nn.MultiheadAttention, which reads its weight "
                "directly, so DropConnect cannot act there"
            )
        if not isinstance(module, nn.Linear | DropConnectLinear):
            raise ValueError(f"layers: {name!r} is a {type(module).__name__}, not an nn.Linear")
    return names


def _following_activation(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """The activation module right after ``name`` in its parent ``nn.Sequential``, if any."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    index = keys.index(child)
    if index + 1 == len(keys):
        return None
    following = parent._modules[keys[index + 1]]
    if not isinstance(following, ACTIVATIONS):
        return None
    prefix = f"{parent_name}." if parent_name else ""
    return f"{prefix}{keys[index + 1]}", following


def apply_dropconnect(model: nn.Module, **options: Any) -> SurgeryReport:
    """Replace chosen ``nn.Linear`` layers of ``model`` by `DropConnectLinear` layers
    (`DropConnectOptions`: ``p=0.5, layers=None, per="batch", groups=4, inference="mean",
    samples=1000, seed=0``).

    ``layers``: dotted names of Linear layers. None: the model's
    ``regdrop_dropconnect_layers`` (regdrop's models declare their hidden FC layers), else
    every ``nn.Linear`` but the last registered one (the classifier), else the only one.
    With ``inference="gaussian"`` the activation right after each layer in its
    ``nn.Sequential`` moves into the layer (module doc); layer ``k`` gets the seed
    ``stream_seed(seed, "dropconnect.site", k)``.
    A model that already has DropConnect is refused (`refuse_reapply`).
    """
    chosen = DropConnectOptions(**options)
    check(chosen)
    p, per, groups, inference, samples = chosen.p, chosen.per, chosen.groups, chosen.inference, chosen.samples
    seed = chosen.seed or 0
    refuse_reapply(model, DropConnectLinear, "apply_dropconnect")
    names = _chosen_layers(model, chosen.layers)
    report = SurgeryReport("dropconnect")
    for index, name in enumerate(names):
        linear = model.get_submodule(name)
        activation = None
        following = _following_activation(model, name) if inference == "gaussian" else None
        if following is not None:
            activation = following[1]
        new = DropConnectLinear(
            linear, p, per=per, groups=groups, inference=inference, samples=samples,
            seed=stream_seed(seed, "dropconnect.site", index), activation=activation,
        )
        report.add(name, replace_module(model, name, new), new)
        if following is not None:
            report.add(following[0], replace_module(model, following[0], nn.Identity()), "Identity")
    return report


METHOD = Method("dropconnect", DropConnectOptions, apply_dropconnect, check)
