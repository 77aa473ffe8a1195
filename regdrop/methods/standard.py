"""Standard dropout - Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks
from Overfitting", JMLR 2014.

Each activation is zeroed independently with probability ``p`` during training. Two forms,
chosen with ``scaling``, agree in expectation:

* ``"inverted"`` (the default, what ``nn.Dropout`` does): survivors are scaled by
  ``1 / (1 - p)`` in training and the network is used as is at test time.
* ``"test_time"`` (the paper's original form): survivors are left unscaled in training and
  the activations are multiplied by ``1 - p`` at evaluation (the paper scales the outgoing
  weights, which is the same for the next linear layer). The factor uses the rate in force,
  so after an early-dropout schedule has switched dropout off, evaluation is unscaled too.

`dropout` is the pure function; `StandardDropout` holds the hyper-parameters and the rate in
force; `apply_standard_dropout` fills a model's drop sites with it.

Speed: on the CPU, and whenever ``torch.compile`` traces the model, the mask is built from
the rate tensor (uniform draws compared with the rate; inductor fuses it into one kernel,
and on the CPU it is 2-3x faster than ``F.dropout``, whose Bernoulli sampler is slow). On an
accelerator in eager mode the inverted form calls torch's fused dropout kernel with a Python
copy of the rate, refreshed from the buffer only when the buffer changes (its version counter), so a
drop-rate schedule costs no device synchronisation. The test-time form always uses the
tensor formula (the fused kernel cannot leave survivors unscaled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from regdrop.methods.base import (
    SITE_KINDS,
    DropModule,
    SurgeryReport,
    check_choice,
    check_rate,
    fill_sites,
    keep_mask,
    normalise_sites,
)
from regdrop.methods.method import Method

__all__ = ["METHOD", "SCALINGS", "StandardDropout", "StandardOptions", "apply_standard_dropout", "dropout"]

Scaling = Literal["inverted", "test_time"]
SCALINGS = ("inverted", "test_time")


def dropout(x: torch.Tensor, rate: torch.Tensor | float, training: bool = True, *,
            inverted: bool = True) -> torch.Tensor:
    """Dropout of ``x`` with drop probability ``rate`` (a 0-d tensor or a float, or a tensor
    that broadcasts to ``x``: a rate per leading copy, say).

    Training: keeps each element when its uniform draw is ``>= rate``; survivors are scaled
    by ``1 / (1 - rate)`` when ``inverted``, left as they are otherwise. Rate 0 returns
    exactly ``x`` (``x * 1.0``); rate 1 returns zeros (for finite ``x``), not NaN.
    Not training: ``x`` itself when ``inverted``, else ``x * (1 - rate)`` (the paper's
    test-time scaling).
    """
    if not training:
        if inverted:
            return x
        return x * (1.0 - torch.as_tensor(rate, dtype=torch.float32, device=x.device)).to(x.dtype)
    return x * keep_mask(x.shape, rate, x, inverted=inverted)


class StandardDropout(DropModule):
    """Standard dropout (Srivastava et al. 2014), element-wise on any shape.

    Args:
        p: the drop probability (the peak rate; a schedule scales the rate in force).
        kind: the kind of drop site the layer fills (``fc``, ``conv``, ``token``, ``attn``);
            it only records where the layer sits, so a second surgery can find it.
        scaling: ``"inverted"`` (survivors x ``1/(1-p)`` in training, identity at test) or
            ``"test_time"`` (no scaling in training, ``x * (1-p)`` at evaluation).
    """

    def __init__(self, p: float = 0.5, *, kind: str = "fc", scaling: Scaling = "inverted"
                 ) -> None:
        super().__init__(p)
        check_choice(kind, "kind", SITE_KINDS)
        check_choice(scaling, "scaling", SCALINGS)
        self.kind = kind
        self.scaling = scaling

    @property
    def p(self) -> float:
        """The rate in force as a float, for code written for ``nn.Dropout`` (timm's fused
        attention passes ``attn_drop.p`` to ``scaled_dot_product_attention``)."""
        return self.rate_value()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaling == "test_time":
            if self.rate_is_zero():
                return x
            # The tensor formula on every device: torch's fused kernel always scales.
            return dropout(x, self.rate, self.training, inverted=False)
        if not self.training:
            return x
        if torch.compiler.is_compiling():
            return dropout(x, self.rate, True)
        p = self.rate_value()
        if p == 0.0:
            return x
        if x.device.type != "cpu":
            # torch's fused kernel: one pass, against three for the tensor formula in eager.
            return F.dropout(x, p, True)
        return dropout(x, self.rate, True)

    def extra_repr(self) -> str:
        return f"{self.rate_repr()}, kind={self.kind!r}, scaling={self.scaling!r}"


@dataclass
class StandardOptions:
    """The options of standard dropout (the keys of ``conf/dropout/standard.yaml``)."""

    p: float | None = 0.5  # null in a config: the model's recommendation (Liu et al.'s rates)
    sites: list[str] = field(default_factory=lambda: ["fc", "token", "attn"])
    scaling: str = "inverted"


def check(options: StandardOptions) -> None:
    """Raise `ValueError` (starting with the option's name) for a bad option; needs no model."""
    check_rate(options.p, "p")
    normalise_sites(options.sites)
    check_choice(options.scaling, "scaling", SCALINGS)


def apply_standard_dropout(model: nn.Module, **options: Any) -> SurgeryReport:
    """Put a `StandardDropout(p, scaling=scaling)` at every drop site of ``model`` whose kind
    is in ``sites`` (`StandardOptions`: ``p=0.5, sites=("fc", "token", "attn"),
    scaling="inverted"``).

    Sites are `DropSite` placeholders and plain torch dropout modules (see `find_sites`).
    A model that already has standard dropout is refused (`refuse_reapply`). ``p = 0.5`` is
    the paper's value for hidden fully connected layers; ``scaling="test_time"`` is the
    paper's original form (see the module docstring).
    """
    chosen = StandardOptions(**options)
    check(chosen)
    return fill_sites(
        model,
        normalise_sites(chosen.sites),
        lambda kind, _site: StandardDropout(chosen.p, kind=kind, scaling=chosen.scaling),
        layer_type=StandardDropout,
        report=SurgeryReport("standard"),
        function="apply_standard_dropout",
    )


METHOD = Method("standard", StandardOptions, apply_standard_dropout, check, recommendable=frozenset({"p"}))
