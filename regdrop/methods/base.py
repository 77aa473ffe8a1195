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

* `SurgeryReport` records what a surgery replaced or inserted, counted per kind of module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

SITE_KINDS = ("fc", "conv", "token", "attn")


class DropSite(nn.Identity):
    """A place where a model accepts a dropout layer; the identity until a method fills it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in SITE_KINDS:
            raise ValueError(f"DropSite kind must be one of {SITE_KINDS}, got {kind!r}")
        self.kind = kind

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class DropModule(nn.Module):
    """Base class of regdrop's drop layers: a peak rate and the rate in force, as a tensor.

    Subclasses read ``self.rate`` (a 0-d float32 buffer) in `forward`, never ``self.peak``.
    """

    rate: torch.Tensor

    def __init__(self, peak: float) -> None:
        super().__init__()
        check_rate(peak, "peak")
        self.peak = float(peak)
        self.register_buffer("rate", torch.tensor(self.peak, dtype=torch.float32))

    def set_rate_factor(self, factor: float) -> None:
        """Set the rate in force to ``factor * peak`` (``factor`` in [0, 1]), in place."""
        self.rate.fill_(self.peak * factor)

    def begin_step(self, step: int) -> None:
        """Called by the trainer before the forward passes of optimizer step ``step``.

        Methods whose randomness is tied to optimizer steps (Gyro's periods) override it;
        for the rest it does nothing.
        """

    def setup_run(self, total_steps: int) -> None:
        """Called once before training with the run's total number of optimizer steps."""


def check_rate(value: float, name: str, *, allow_one: bool = False) -> None:
    """Raise `ValueError` unless ``value`` is a valid drop rate."""
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 <= value and upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be a drop rate in {bound}, got {value!r}")


def drop_modules(model: nn.Module) -> Iterator[DropModule]:
    """Every `DropModule` in ``model``."""
    return (m for m in model.modules() if isinstance(m, DropModule))


def set_rate_factor(model: nn.Module, factor: float) -> None:
    """Scale every drop layer of ``model`` to ``factor`` times its peak rate."""
    for module in drop_modules(model):
        module.set_rate_factor(factor)


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

    def add(self, name: str, old: nn.Module | str, new: nn.Module | str) -> None:
        old_name = old if isinstance(old, str) else type(old).__name__
        new_name = new if isinstance(new, str) else type(new).__name__
        self.changes.append((name, old_name, new_name))

    def extend(self, other: SurgeryReport) -> None:
        self.changes.extend(other.changes)

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
