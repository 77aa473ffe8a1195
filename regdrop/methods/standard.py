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

from collections.abc import Iterable

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

__all__ = ["StandardDropout", "apply_standard_dropout", "dropout"]


def dropout(x: torch.Tensor, rate: torch.Tensor | float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of ``x`` with drop probability ``rate`` (a 0-d tensor or a float, or a
    tensor that broadcasts to ``x``: a rate per leading copy, say).

    Keeps each element when its uniform draw is ``>= rate`` and scales survivors by
    ``1 / (1 - rate)``. Rate 0 returns exactly ``x`` (``x * 1.0``); rate 1 returns zeros
    (for finite ``x``), not NaN. Not training: ``x`` itself.
    """
    if not training:
        return x
    return x * keep_mask(x.shape, rate, x)


class StandardDropout(DropModule):
    """Standard inverted dropout (Srivastava et al. 2014), element-wise on any shape.

    Args:
        p: the drop probability (the peak rate; a schedule scales the rate in force).
        kind: the kind of drop site the layer fills (``fc``, ``conv``, ``token``, ``attn``);
            it only records where the layer sits, so a second surgery can find it.
    """

    def __init__(self, p: float = 0.5, *, kind: str = "fc") -> None:
        super().__init__(p)
        check_choice(kind, "kind", SITE_KINDS)
        self.kind = kind

    @property
    def p(self) -> float:
        """The rate in force as a float, for code written for ``nn.Dropout`` (timm's fused
        attention passes ``attn_drop.p`` to ``scaled_dot_product_attention``)."""
        return self.rate_value()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        return f"p={self.peak}, kind={self.kind!r}"


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
    return fill_sites(
        model,
        normalise_sites(sites),
        lambda kind, _site: StandardDropout(p, kind=kind),
        layer_type=StandardDropout,
        peak=p,
        report=SurgeryReport("standard"),
        function="apply_standard_dropout",
    )
