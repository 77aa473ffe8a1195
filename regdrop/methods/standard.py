"""Standard (inverted) dropout - Srivastava et al., "Dropout: A Simple Way to Prevent Neural
Networks from Overfitting", JMLR 2014.

Each activation is zeroed independently with probability ``p`` during training and the
survivors are scaled by ``1 / (1 - p)`` ("inverted" dropout), so the network is used as is
at test time. The paper scales the weights by ``1 - p`` at test time instead; the two agree
in expectation.

`dropout` is the pure function; `StandardDropout` holds the hyper-parameters and the rate in
force; `apply_standard_dropout` fills a model's drop sites with it.

Speed: on the CPU, and whenever ``torch.compile`` traces the model, the mask is built from
the rate tensor (uniform draws compared with the rate; inductor fuses it into one kernel,
and on the CPU it is 2-3x faster than ``F.dropout``, whose Bernoulli sampler is slow). On an
accelerator in eager mode the layer calls torch's fused dropout kernel with a Python copy of
the rate, refreshed from the buffer only when the buffer changes (its version counter), so a
drop-rate schedule costs no device synchronisation.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from regdrop.methods.base import (
    SITE_KINDS,
    DropModule,
    MethodNotApplicable,
    SurgeryReport,
    check_rate,
    find_sites,
    replace_module,
    site_kind,
)

__all__ = ["StandardDropout", "apply_standard_dropout", "dropout"]


def keep_scale(rate: torch.Tensor) -> torch.Tensor:
    """``1 / (1 - rate)``, and 0 for ``rate == 1`` (everything dropped, no ``0 * inf`` NaN)."""
    keep = 1.0 - rate
    return torch.where(keep > 0, keep.reciprocal(), torch.zeros_like(keep))


def keep_mask(shape: torch.Size | list[int], rate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An inverted-dropout multiplier of ``shape``: ``1/(1-rate)`` where kept, 0 where dropped.

    A unit is kept when its uniform draw is ``>= rate``. The draws are float32 (float64 for
    float64 data), never the half-precision dtype of ``like``, whose coarse uniforms would
    bias the keep probability; the mask is returned in ``like``'s dtype and device.
    """
    draw_dtype = torch.promote_types(like.dtype, torch.float32)
    mask = torch.rand(shape, dtype=draw_dtype, device=like.device)
    return mask.ge_(rate).mul_(keep_scale(rate)).to(like.dtype)


def dropout(x: torch.Tensor, rate: torch.Tensor | float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of ``x`` with drop probability ``rate`` (a 0-d tensor or a float).

    Keeps each element when its uniform draw is ``>= rate`` and scales survivors by
    ``1 / (1 - rate)``. Rate 0 returns exactly ``x`` (``x * 1.0``); rate 1 returns zeros
    (for finite ``x``), not NaN. Not training: ``x`` itself.
    """
    if not training:
        return x
    rate = torch.as_tensor(rate, dtype=torch.float32, device=x.device)
    return x * keep_mask(x.shape, rate, x)


def _float32(value: float) -> float:
    """``value`` rounded to float32, as the rate buffer stores it."""
    return struct.unpack("f", struct.pack("f", value))[0]


def rate_value(module: DropModule) -> float:
    """The rate in force of ``module`` as a Python float, read from its buffer only on change.

    The float is cached together with the buffer object and its version counter, which every
    in-place change bumps (``fill_``, ``load_state_dict``'s ``copy_``); ``.to(device)``
    makes a new buffer. So a device synchronisation happens at most once per change, and
    not at all for changes made through ``set_rate_factor`` (see `remember_rate`).
    """
    rate = module.rate
    cached = module.__dict__.get("_rate_mirror")
    if cached is not None and cached[0] is rate and cached[1] == rate._version:
        return cached[2]
    value = float(rate)
    module.__dict__["_rate_mirror"] = (rate, rate._version, value)
    return value


def remember_rate(module: DropModule, value: float) -> None:
    """Cache ``value``, which was just written into ``module.rate``, without reading the device."""
    module.__dict__["_rate_mirror"] = (module.rate, module.rate._version, _float32(value))


def rate_is_zero(module: DropModule) -> bool:
    """True when ``module``'s rate is 0 and we run eagerly (a cheap Python-level shortcut).

    Under ``torch.compile`` it is always False: the tensor path is exact at rate 0 anyway
    and a Python float would make the compiled graph depend on the rate's value.
    """
    return not torch.compiler.is_compiling() and rate_value(module) == 0.0


class _MirroredRate(DropModule):
    """A `DropModule` that keeps a Python copy of its rate for eager-mode decisions."""

    def set_rate_factor(self, factor: float) -> None:
        super().set_rate_factor(factor)
        remember_rate(self, self.peak * factor)

    def reset_peak(self, peak: float) -> None:
        """Make ``peak`` the configured rate and the rate in force (a re-applied surgery)."""
        check_rate(peak, "peak")
        self.peak = float(peak)
        self.set_rate_factor(1.0)


class StandardDropout(_MirroredRate):
    """Standard inverted dropout (Srivastava et al. 2014), element-wise on any shape.

    Args:
        p: the drop probability (the peak rate; a schedule scales the rate in force).
        kind: the kind of drop site the layer fills (``fc``, ``conv``, ``token``, ``attn``);
            it only records where the layer sits, so a second surgery can find it.
    """

    def __init__(self, p: float = 0.5, *, kind: str = "fc") -> None:
        super().__init__(p)
        if kind not in SITE_KINDS:
            raise ValueError(f"kind must be one of {SITE_KINDS}, got {kind!r}")
        self.kind = kind

    @property
    def p(self) -> float:
        """The rate in force as a float, for code written for ``nn.Dropout`` (timm's fused
        attention passes ``attn_drop.p`` to ``scaled_dot_product_attention``)."""
        return rate_value(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if torch.compiler.is_compiling():
            return dropout(x, self.rate, True)
        p = rate_value(self)
        if p == 0.0:
            return x
        if x.device.type != "cpu":
            # torch's fused kernel: one pass, against three for the tensor formula in eager.
            return F.dropout(x, p, True)
        return dropout(x, self.rate, True)

    def extra_repr(self) -> str:
        return f"p={self.peak}, kind={self.kind!r}"


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


def not_applicable(method: str, model: nn.Module, kinds: tuple[str, ...]) -> MethodNotApplicable:
    """The error for a model without drop sites of the wanted kinds."""
    present = sorted({site_kind(module) for _, module in find_sites(model)})
    return MethodNotApplicable(
        f"{method} found no drop site of kind {list(kinds)} in {type(model).__name__}. It looks "
        "for DropSite(kind) placeholders and plain nn.Dropout (fc), nn.Dropout1d (token) and "
        f"nn.Dropout2d (conv) modules; this model has sites of kind {present or 'none'}. "
        "Build the model with DropSite placeholders where dropout should go, or pass sites= "
        "with the kinds the model has."
    )


def apply_standard_dropout(
    model: nn.Module, *, p: float = 0.5, sites: Iterable[str] = ("fc", "token", "attn")
) -> SurgeryReport:
    """Put a `StandardDropout(p)` at every drop site of ``model`` whose kind is in ``sites``.

    Sites are `DropSite` placeholders and plain torch dropout modules (see `find_sites`).
    Applying again does not wrap twice: a `StandardDropout` already at a site of those kinds
    gets ``p`` as its peak and rate in force (reported as ``StandardDropout -> StandardDropout``).
    ``p = 0.5`` is the paper's value for hidden fully connected layers.
    """
    check_rate(p, "p")
    kinds = normalise_sites(sites)
    report = SurgeryReport("standard")
    for name, module in model.named_modules():
        if isinstance(module, StandardDropout) and module.kind in kinds:
            module.reset_peak(p)
            report.add(name, module, module)
    for name, site in find_sites(model, kinds):
        new = StandardDropout(p, kind=site_kind(site))
        report.add(name, replace_module(model, name, new), new)
    if not report:
        raise not_applicable("apply_standard_dropout", model, kinds)
    return report
