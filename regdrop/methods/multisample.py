"""Multi-sample dropout: several dropout masks on the same features through one shared head.

Inoue, "Multi-Sample Dropout for Accelerated Training and Better Generalization", 2019.
The dropout before the classifier and the classifier itself are duplicated ``M`` times;
each copy draws its own mask on the *same* features, the copies *share* the classifier's
weights, and the training loss is the *mean of the M per-copy losses*. At inference one
copy runs with dropout off. Two common wrong versions are avoided: the loss of the
averaged logits (which is not the paper's loss and regularizes less), and ``M`` separate
heads (which do not share weights).

`MultiSampleHead` runs the copies in one batched pass: the features are stacked ``M``
times, masked, and sent through the head once, giving logits of shape ``M x B x C`` in
training (``B x C`` in evaluation). `multisample_loss` turns them into the paper's loss
in one call, and `collapse_copies` averages them for accuracy. Per-copy rates (``rates``)
are an option of this implementation; the paper uses the same rate in every copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regdrop.methods.base import (
    DropModule,
    MethodNotApplicable,
    SurgeryReport,
    check_int,
    check_rate,
    find_sites,
    normalise_sites,
    refuse_reapply,
    replace_module,
    site_kind,
)
from regdrop.methods.method import Method
from regdrop.methods.standard import StandardDropout, dropout


def multisample_dropout(x: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """``M`` inverted-dropout copies of ``x``: shape ``M x *x.shape``, copy ``m`` at ``rates[m]``.

    Standard inverted `dropout` of ``x`` expanded ``M`` times (one mask per copy, from
    torch's global RNG); a copy at rate 0 is exactly ``x``.
    """
    samples = rates.shape[0]
    return dropout(x.expand(samples, *x.shape), rates.view(samples, *([1] * x.ndim)))


class MultiSampleHead(DropModule):
    """Multi-sample dropout (Inoue 2019) around a shared linear classifier.

    Training: features ``B x ... x F`` -> ``M`` stacked inverted-dropout copies (one mask
    each, copy ``m`` at rate ``rates[m]``, all ``p`` by default) -> one batched pass of the
    shared ``head`` -> logits ``M x B x ... x C``. Evaluation: ``head(x)``, no dropout,
    ``B x ... x C``. Train with `multisample_loss` (the mean of the per-copy losses).

    ``peak`` is the largest copy rate; per-copy rates in force are ``rate * profile`` with
    ``profile = rates / peak``, so a drop-rate schedule scales every copy alike.
    """

    profile: torch.Tensor

    def __init__(self, head: nn.Linear, *, p: float = 0.5, samples: int = 8,
                 rates: Sequence[float] | None = None) -> None:
        if not isinstance(head, nn.Linear):
            raise ValueError(f"head must be an nn.Linear, got {type(head).__name__}")
        check_int(samples, "samples", positive=True)
        check_rate(p, "p")
        if rates is None:
            rates = [p] * samples
        rates = [float(r) for r in rates]
        if len(rates) != samples:
            raise ValueError(f"rates must hold one rate per copy (samples={samples}), "
                             f"got {len(rates)}")
        for rate in rates:
            check_rate(rate, "rates")
        peak = max(rates)
        super().__init__(peak)
        self.head = head
        self.samples = samples
        self.p = float(p)
        self.rates = tuple(rates)
        profile = [r / peak if peak > 0 else 0.0 for r in rates]
        self.register_buffer("profile", torch.tensor(profile, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.head(x)
        return self.head(multisample_dropout(x, self.rate * self.profile))

    def extra_repr(self) -> str:
        rates = ", ".join(f"{r:.4g}" for r in self.rates)
        return f"samples={self.samples}, {self.rate_repr()}, rates=[{rates}]"


def multisample_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """The multi-sample dropout loss: the mean over copies of each copy's mean loss.

    ``logits`` ``M x B x C`` (training output of `MultiSampleHead`) -> one call of
    ``loss_fn`` on the ``M * B`` rows with the targets repeated per copy; as every copy has
    the same ``B`` rows, the mean over all rows is the mean of the per-copy means.
    ``logits`` ``B x C`` -> plain ``loss_fn(logits, targets)``. ``loss_fn`` must reduce by
    the mean (class weights are fine: every copy has the same targets); ``targets`` may be
    class indices (``B``) or soft targets (``B x C``).
    """
    if logits.ndim == 2:
        return loss_fn(logits, targets)
    if logits.ndim != 3:
        raise ValueError(f"logits must be B x C or M x B x C, got shape {tuple(logits.shape)}")
    samples, batch = logits.shape[:2]
    repeated = targets.unsqueeze(0).expand(samples, *targets.shape)
    return loss_fn(logits.reshape(samples * batch, -1),
                   repeated.reshape(samples * batch, *targets.shape[1:]))


def collapse_copies(logits: torch.Tensor) -> torch.Tensor:
    """``B x C`` logits for accuracy: the mean over copies of ``M x B x C`` logits."""
    return logits.mean(0) if logits.ndim == 3 else logits


@dataclass
class MultiSampleOptions:
    """The options of multi-sample dropout (the keys of ``conf/dropout/multisample.yaml``)."""

    p: float = 0.5
    samples: int = 8
    rates: list[float] | None = None
    sites: list[str] = field(default_factory=lambda: ["fc", "token", "attn"])
    head: str | None = None


def check(options: MultiSampleOptions) -> None:
    """Raise `ValueError` (starting with the option's name) for a bad option; needs no model."""
    check_rate(options.p, "p")
    check_int(options.samples, "samples", positive=True)
    if options.rates is not None:
        rates = list(options.rates)
        if len(rates) != options.samples:
            raise ValueError(f"rates must hold one rate per copy (samples={options.samples}), got {len(rates)}")
        for rate in rates:
            check_rate(rate, "rates")
    normalise_sites(options.sites)
    if options.head is not None and not isinstance(options.head, str):
        raise ValueError(f"head must be the dotted name of the classifier or null, got {options.head!r}")


def apply_multisample_dropout(model: nn.Module, **options: Any) -> SurgeryReport:
    """Install multi-sample dropout on the classifier of ``model``, in place
    (`MultiSampleOptions`: ``p=0.5, samples=8, rates=None, sites=("fc", "token", "attn"),
    head=None``).

    ``head`` is the dotted name of the final classifier ``nn.Linear`` (default: the last
    ``nn.Linear`` registered in the model); it becomes a `MultiSampleHead` with ``samples``
    copies at rate ``p`` (or per-copy ``rates``). The drop site feeding the head - the last
    site registered before it, with no module holding parameters in between - becomes
    ``nn.Identity``: its dropout moves into the head. Every other site of the ``sites``
    kinds gets a `StandardDropout` at ``p``. Inoue uses ``samples=8`` (little gain
    beyond) and the network's usual dropout rate.

    The head's parameters keep their objects but their ``state_dict`` keys gain ``.head``
    (``fc.weight`` -> ``fc.head.weight``). Raises `MethodNotApplicable` when the model has
    no ``nn.Linear``; a model that already has multi-sample dropout is refused
    (`refuse_reapply`).
    """
    chosen = MultiSampleOptions(**options)
    check(chosen)
    p, samples, rates, sites, head = chosen.p, chosen.samples, chosen.rates, chosen.sites, chosen.head
    refuse_reapply(model, MultiSampleHead, "apply_multisample_dropout")
    others = find_sites(model, sites)

    modules = list(model.named_modules())
    if head is None:
        linears = [name for name, m in modules if isinstance(m, nn.Linear)]
        if not linears:
            raise MethodNotApplicable(
                f"multi-sample dropout duplicates the final classifier, an nn.Linear, and "
                f"{type(model).__name__} has none. Give a model that ends in a linear "
                "classifier (any regdrop model, torchvision ResNet, timm ViT), or name the "
                "classifier with head=<dotted name>.")
        head = linears[-1]
    names = [name for name, _ in modules]
    if head not in names or not isinstance(model.get_submodule(head), nn.Linear):
        raise ValueError(f"head must name an nn.Linear of the model, got {head!r}")
    if head == "":
        raise ValueError("head: the model itself is the classifier; wrap it in a module")
    head_index = names.index(head)

    feeding = _site_feeding(modules, head_index)
    report = SurgeryReport("multisample")
    for name, site in others:
        if name == feeding:
            continue
        new = StandardDropout(p, kind=site_kind(site, name))
        replace_module(model, name, new)
        report.add(name, site, new)
    if feeding is not None:
        old = replace_module(model, feeding, nn.Identity())
        report.add(feeding, old, "Identity")
    linear = model.get_submodule(head)
    new_head = MultiSampleHead(linear, p=p, samples=samples, rates=rates)
    replace_module(model, head, new_head)
    report.add(head, linear, new_head)
    return report


def _site_feeding(modules: list[tuple[str, nn.Module]], head_index: int) -> str | None:
    """The last drop site registered before the head, unless parameters lie in between.

    A drop layer already installed by another method stops the search too: it is left as is.
    """
    for name, module in reversed(modules[:head_index]):
        if site_kind(module) is not None:
            return name
        if isinstance(module, DropModule) or any(True for _ in module.parameters(recurse=False)):
            return None
    return None



METHOD = Method("multisample", MultiSampleOptions, apply_multisample_dropout, check,
                training_loss=multisample_loss, predictions=collapse_copies)
