"""What every dropout method shares: drop sites, rate-holding modules and surgery reports.

* `DropSite` is an identity placeholder that a model puts wherever a dropout layer may
  go. Its `kind` says what kind of activation flows through it, so that a method can pick
  the sites it applies to:

  - ``fc``: ``B x F`` features after a hidden fully connected layer, or pooled features
    before the classifier;
  - ``conv``: ``B x C x H x W`` convolutional feature maps;
  - ``token``: ``B x T x C`` token activations (position embedding, projections, MLPs);
  - ``attn``: ``B x heads x T x T`` attention probabilities.

  A site is present even when no method uses it, so a model can be built once and have
  any method installed later (timm, by contrast, builds `Identity` for a zero rate).

* `DropModule` is the base of every regdrop layer whose strength is a drop rate. The
  hyper-parameter ``peak`` is the configured rate; the rate in force is the tensor buffer
  ``rate``, which a drop-rate schedule moves with `set_rate_factor`. Holding the rate in
  a tensor means a compiled model sees a changing value, not a changing constant, and is
  not recompiled each step. ``rate`` is in the ``state_dict``, so a resumed run continues
  from the rate it stopped at.

  Eager code that must decide in Python (skip work at rate 0, hand a float to a fused
  kernel, draw a block-mode gate) reads `DropModule.rate_value`: a Python copy of the rate
  refreshed only when the buffer changes, so a schedule costs no device synchronisation.

* `SurgeryReport` records what a surgery replaced or inserted, counted per kind of module.

The rest is what several methods share: argument checks that name the parameter at fault
(`check_rate`, `check_choice`, `check_int`), the inverted
keep mask (`keep_mask`), and site surgery (`find_sites`, `normalise_sites`, `fill_sites`,
`replace_module`, `not_applicable`).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

SITE_KINDS = ("fc", "conv", "token", "attn")

# -- argument checks: each raises `ValueError` starting with the parameter's name ----------


def check_rate(value: float, name: str, *, allow_one: bool = False) -> None:
    """Raise `ValueError` unless ``value`` is a valid drop rate (a number, not a bool)."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    upper_ok = is_number and (value <= 1.0 if allow_one else value < 1.0)
    if not (upper_ok and value >= 0.0):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be a drop rate in {bound}, got {value!r}")


def check_choice(value: str, name: str, choices: Iterable[str]) -> None:
    """Raise `ValueError` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def is_int(value: object) -> bool:
    """True for Python, numpy and 0-d torch integers (anything with ``__index__``), not bools."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_int(value: object, name: str, *, positive: bool = False) -> None:
    """Raise `ValueError` unless ``value`` is an integer (``>= 1`` if ``positive``)."""
    if not is_int(value) or (positive and value < 1):
        kind = "a positive integer" if positive else "an integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


# -- drop sites and drop layers ------------------------------------------------------------


# Where the features (channels) of each kind's activation are, unless a site says otherwise.
FEATURE_AXIS = {"fc": -1, "conv": 1, "token": -1, "attn": -1}


class DropSite(nn.Identity):
    """A place where a model accepts a dropout layer; the identity until a method fills it.

    ``feature_axis`` is the axis of the activation's features (channels), for the methods
    that mask whole features (spatial, gyro). It defaults to the kind's usual layout and is
    given where a model differs: the token-mixing MLP of MLP-Mixer sees ``B x C x T``
    (features on axis 1) at its ``token`` sites.
    """

    def __init__(self, kind: str, feature_axis: int | None = None) -> None:
        super().__init__()
        check_choice(kind, "kind", SITE_KINDS)
        self.kind = kind
        self.feature_axis = FEATURE_AXIS[kind] if feature_axis is None else feature_axis

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, feature_axis={self.feature_axis}"


def feature_axis(site: nn.Module) -> int:
    """The feature (channel) axis of the activation at a drop site.

    A `DropSite` says it; torch's ``Dropout1d``/``Dropout2d`` expect channels on axis 1;
    a plain ``nn.Dropout`` is taken to see features last.
    """
    if isinstance(site, DropSite):
        return site.feature_axis
    return 1 if isinstance(site, nn.Dropout1d | nn.Dropout2d | nn.Dropout3d) else -1


class DropModule(nn.Module):
    """Base class of regdrop's drop layers: a peak rate and the rate in force, as a tensor.

    Subclasses read ``self.rate`` (a 0-d float32 buffer) in `forward`, never ``self.peak``;
    eager code that needs the rate as a Python float reads `rate_value`.
    """

    rate: torch.Tensor

    def __init__(self, peak: float) -> None:
        super().__init__()
        check_rate(peak, "peak")
        self.peak = float(peak)
        self.register_buffer("rate", torch.tensor(self.peak, dtype=torch.float32))
        # (buffer, its version counter, its value): see `rate_value`.
        self._rate_mirror: tuple[torch.Tensor, int, float] | None = None

    def set_rate_factor(self, factor: float) -> None:
        """Set the rate in force to ``factor * peak`` (``factor`` in [0, 1]), in place."""
        value = self.peak * factor
        self.rate.fill_(value)
        # The value just written, rounded as the buffer stores it: no device read.
        stored = stored_as(value, self.rate.dtype)
        self._rate_mirror = (self.rate, self.rate._version, stored)

    def rate_repr(self, name: str = "p") -> str:
        """``p=<peak>, rate=<rate in force>`` for `extra_repr`: the peak alone would hide an
        early-dropout cutoff (peak 0.1 while 0 runs)."""
        try:
            rate = f"{self.rate_value():.4g}"
        except (NotImplementedError, RuntimeError):  # a meta tensor has no value
            rate = "?"
        return f"{name}={self.peak:.4g}, rate={rate}"

    def rate_value(self) -> float:
        """The rate in force as a Python float, read from the buffer only when it changed.

        The float is cached with the buffer object and its version counter, which every
        in-place change bumps (``fill_``, ``load_state_dict``'s ``copy_``); ``.to(device)``
        makes a new buffer. So an accelerator is synchronised at most once per change, and
        not at all for changes made through `set_rate_factor`. A write through
        ``rate.data`` bypasses the version counter and is not seen.
        """
        rate = self.rate
        try:
            version = rate._version
        except RuntimeError:  # inference-mode tensors carry no version counter
            return float(rate)
        mirror = self._rate_mirror
        if mirror is None or mirror[0] is not rate or mirror[1] != version:
            mirror = (rate, version, float(rate))
            self._rate_mirror = mirror
        return mirror[2]

    def rate_is_zero(self) -> bool:
        """True when the rate is 0 and we run eagerly (a cheap Python-level shortcut).

        Under ``torch.compile`` it is always False: the tensor path is exact at rate 0 anyway
        and a Python float would make the compiled graph depend on the rate's value.
        """
        return not torch.compiler.is_compiling() and self.rate_value() == 0.0

    def begin_step(self, step: int) -> None:
        """Called by the trainer before the forward passes of optimizer step ``step``.

        Methods whose randomness is tied to optimizer steps (Gyro's periods) override it;
        for the rest it does nothing.
        """

    def setup_run(self, total_steps: int, rank: int = 0, world_size: int = 1) -> None:
        """Called once before training with the run's total number of optimizer steps and
        this process's rank among ``world_size`` data-parallel processes."""


def stored_as(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded as a tensor of ``dtype`` stores it, computed on the host (no tensor,
    no device read): float32/float16 through numpy, bfloat16 by rounding float32's bits to
    nearest-even in the upper 16."""
    if dtype == torch.float32:
        return float(np.float32(value))
    if dtype == torch.float16:
        return float(np.float16(value))
    if dtype == torch.bfloat16:
        bits = int(np.float32(value).view(np.uint32))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return float(np.uint32(bits).view(np.float32))
    return float(value)


def keep_scale(rate: torch.Tensor) -> torch.Tensor:
    """``1 / (1 - rate)``, and 0 for ``rate == 1`` (everything dropped, no ``0 * inf`` NaN)."""
    keep = 1.0 - rate
    return torch.where(keep > 0, keep.reciprocal(), torch.zeros_like(keep))


def keep_mask(
    shape: torch.Size | Iterable[int],
    rate: torch.Tensor | float,
    like: torch.Tensor,
    *,
    inverted: bool = True,
) -> torch.Tensor:
    """A dropout multiplier of ``shape``: 0 where dropped, ``1/(1-rate)`` (1 if not
    ``inverted``) where kept.

    A unit is kept when its uniform draw is ``>= rate``; ``rate`` is a float or a tensor
    that broadcasts to ``shape`` (per-copy rates, say). The draws are float32 (float64 for
    float64 data), never the half-precision dtype of ``like``, whose coarse uniforms would
    bias the keep probability; the mask is returned in ``like``'s dtype and device.
    """
    rate = torch.as_tensor(rate, dtype=torch.float32, device=like.device)
    draw_dtype = torch.promote_types(like.dtype, torch.float32)
    mask = torch.rand(tuple(shape), dtype=draw_dtype, device=like.device).ge_(rate)
    if inverted:
        mask.mul_(keep_scale(rate))
    return mask.to(like.dtype)


def drop_modules(model: nn.Module) -> Iterator[DropModule]:
    """Every `DropModule` in ``model``."""
    return (m for m in model.modules() if isinstance(m, DropModule))


def set_rate_factor(model: nn.Module, factor: float) -> None:
    """Scale every drop layer of ``model`` to ``factor`` times its peak rate."""
    for module in drop_modules(model):
        module.set_rate_factor(factor)


# -- surgery -------------------------------------------------------------------------------


class MethodNotApplicable(ValueError):
    """A method cannot be installed in this model (no sites, no residual blocks, ...)."""


# Plain torch dropout layers count as sites too, so that the functional API works on any
# model (torchvision's AlexNet, say); their kind follows from the activation they expect.
_TORCH_DROPOUT_KINDS = {nn.Dropout: "fc", nn.Dropout1d: "token", nn.Dropout2d: "conv"}


def site_kind(module: nn.Module, name: str = "") -> str | None:
    """The site kind of ``module`` (called ``name``) if it is a drop site, else None.

    A `DropSite` says its kind; a plain torch dropout gets the kind of the activation it
    expects, and timm's attention-probability dropout (``attn_drop``) is an ``attn`` site.
    """
    if isinstance(module, DropSite):
        return module.kind
    kind = _TORCH_DROPOUT_KINDS.get(type(module))
    if kind is not None and name.rpartition(".")[2] == "attn_drop":
        return "attn"
    return kind


def find_sites(model: nn.Module, kinds: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The drop sites of ``model`` of the given kinds (all kinds if None), in module order.

    A site is a `DropSite`, or a plain ``nn.Dropout`` (kind ``fc``), ``nn.Dropout1d``
    (``token``) or ``nn.Dropout2d`` (``conv``) left in a model that regdrop did not build.
    """
    wanted = None if kinds is None else set(kinds)
    unknown = set() if wanted is None else wanted - set(SITE_KINDS)
    if unknown:
        raise ValueError(f"sites: unknown site kind(s) {sorted(unknown)}; valid: {list(SITE_KINDS)}")
    found = []
    for name, module in model.named_modules():
        kind = site_kind(module, name)
        if kind is not None and (wanted is None or kind in wanted):
            found.append((name, module))
    return found


def normalise_sites(
    sites: Iterable[str] | str, valid: Iterable[str] = SITE_KINDS, why: str = ""
) -> tuple[str, ...]:
    """``sites`` as a tuple of site kinds, each in ``valid``; `ValueError` naming ``sites``."""
    kinds = (sites,) if isinstance(sites, str) else tuple(sites)
    valid = tuple(valid)
    if not kinds:
        raise ValueError(f"sites must name at least one site kind of {list(valid)}, got none")
    bad = [kind for kind in kinds if kind not in valid]
    if bad:
        reason = f" ({why})" if why else ""
        raise ValueError(f"sites: {bad} not valid here{reason}; valid kinds: {list(valid)}")
    return kinds


def not_applicable(function: str, model: nn.Module, kinds: Iterable[str]) -> MethodNotApplicable:
    """The error of ``function`` for a model without drop sites of the wanted kinds."""
    present = sorted({site_kind(module, name) for name, module in find_sites(model)})
    return MethodNotApplicable(
        f"{function} found no drop site of kind {list(kinds)} in {type(model).__name__}. It "
        "looks for DropSite(kind) placeholders and plain nn.Dropout (fc), nn.Dropout1d (token) "
        f"and nn.Dropout2d (conv) modules; this model has sites of kind {present or 'none'}. "
        "Build the model with DropSite placeholders where dropout should go, or pass sites= "
        "with the kinds the model has."
    )


def fill_sites(
    model: nn.Module,
    kinds: tuple[str, ...],
    build: Callable[[str, nn.Module], DropModule],
    *,
    layer_type: type[DropModule],
    report: SurgeryReport,
    function: str,
) -> SurgeryReport:
    """Put ``build(kind, site)`` at every drop site of ``kinds``; return ``report``.

    Refuses a model that already has ``layer_type`` layers (`refuse_reapply`), and raises
    `MethodNotApplicable` (naming ``function``) when there is nothing to fill.
    """
    refuse_reapply(model, layer_type, function)
    for name, site in find_sites(model, kinds):
        new = build(site_kind(site, name), site)
        report.add(name, replace_module(model, name, new), new)
    if not report:
        raise not_applicable(function, model, kinds)
    return report


def method_defaults(model: nn.Module, method: str) -> dict:
    """The hyper-parameters ``model`` recommends for ``method`` (its class attribute
    ``regdrop_method_defaults[method]``; empty when it has none)."""
    return dict(getattr(model, "regdrop_method_defaults", {}).get(method, {}))


class MethodAlreadyApplied(ValueError):
    """A method's surgery was asked for on a model that already has that method."""


def refuse_reapply(model: nn.Module, layer_type: type[nn.Module], function: str) -> None:
    """The one re-apply policy of every method: a model takes each method once.

    Applying a method to a model that already holds its layers raises
    `MethodAlreadyApplied` naming the first of them, whatever the hyper-parameters: a
    second surgery could only guess whether to keep or replace the first one's state
    (gyro's trained bank, stochastic depth's gates). Change the strength of an installed
    method with `set_rate_factor` (or a drop-rate schedule); change its hyper-parameters by
    building the model again.
    """
    installed = [name for name, m in model.named_modules() if isinstance(m, layer_type)]
    if installed:
        raise MethodAlreadyApplied(
            f"{function}: the model already has {len(installed)} {layer_type.__name__} "
            f"layer(s) (first: {installed[0] or '<root>'}); a method is applied once, to a "
            "model built without it. Change its rate with set_rate_factor, or build the "
            "model again to change its hyper-parameters."
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the sub-module called ``name`` is, on the old one's device and dtype.

    Returns the module that was replaced.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
    _move_like(new, old, parent)
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    if child == "attn_drop" and getattr(parent, "fused_attn", False):
        # timm's fused attention reads ``attn_drop.p`` as a float and never calls the
        # module; the explicit path calls it, so the new layer actually runs.
        parent.fused_attn = False
    return old


def _move_like(new: nn.Module, *references: nn.Module) -> None:
    """Move ``new`` to the device (and floating dtype) of the first reference with tensors."""
    for ref in references:
        tensor = next(ref.parameters(), None)
        if tensor is None:
            tensor = next(ref.buffers(), None)
        if tensor is not None:
            new.to(device=tensor.device)
            if tensor.is_floating_point():
                # Rate buffers stay float32: they are compared against uniform draws.
                for param in new.parameters(recurse=True):
                    param.data = param.data.to(tensor.dtype)
            return


@dataclass
class SurgeryReport:
    """What a surgery did: one entry per module replaced or inserted."""

    method: str
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (name, old, new)
    options: dict[str, object] = field(default_factory=dict)  # the hyper-parameters used
    notes: list[str] = field(default_factory=list)  # where a value came from, when not given

    def add(self, name: str, old: nn.Module | str, new: nn.Module | str) -> None:
        old_name = old if isinstance(old, str) else type(old).__name__
        new_name = new if isinstance(new, str) else type(new).__name__
        self.changes.append((name, old_name, new_name))

    def describe_method(self) -> str:
        """``gyro (p=0.5, sigma=1024, tau=8, ...)``: the method and every hyper-parameter used."""
        options = ", ".join(f"{key}={value}" for key, value in self.options.items())
        notes = "".join(f"; {note}" for note in self.notes)
        return f"{self.method} ({options}){notes}" if options or notes else self.method

    def lines(self) -> list[str]:
        """The method line, then one line per change: ``name: Old -> New``."""
        return [self.describe_method(), *(f"  {n or '<root>'}: {o} -> {w}" for n, o, w in self.changes)]

    def counts(self) -> dict[str, int]:
        """How many modules were changed, per ``"Old -> New"`` kind."""
        return dict(Counter(f"{old} -> {new}" for _, old, new in self.changes))

    def __len__(self) -> int:
        return len(self.changes)

    def summary(self) -> str:
        if not self.changes:
            return f"{self.method}: no change"
        parts = ", ".join(f"{n} x {kind}" for kind, n in sorted(self.counts().items()))
        return f"{self.method}: {parts}"
