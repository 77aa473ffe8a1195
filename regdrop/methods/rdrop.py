"""R-Drop - Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021.

Every training sample goes through the network twice; the two passes draw independent
dropout masks, so they are two sub-models with predictive distributions ``P1`` and ``P2``.
The paper's loss of a sample (its Eq. 3) is::

    L = CE(P1, y) + CE(P2, y) + alpha * (KL(P1 || P2) + KL(P2 || P1)) / 2

regdrop trains on half of it, averaged over the batch::

    loss = (CE1 + CE2) / 2 + alpha * (KL(P1 || P2) + KL(P2 || P1)) / 4

the same minimiser and the same meaning of ``alpha`` as the paper, on the scale of one pass's
cross-entropy, so that the logged training loss compares with the other methods' (for SGD
it is the paper's loss at half the learning rate; Adam does not see the factor). KL is
summed over the classes and computed in float32 at least. With mixed-sample targets (mixup) each
pass's cross-entropy takes the soft targets; the KL term needs no labels.

R-Drop is not a mask of its own: it runs on top of a **base** method that has masks
(``base``, standard dropout by default, with ``base_options``), installed by the same
surgery as ``dropout=<base>``. It needs the masks of the two passes to differ, so bases whose
masks are fixed within a step (gyro's subnetworks) or that change the logits' shape
(multi-sample) are refused, as is ``none``.

The two passes are two calls of the network, not one call on the batch stacked twice (the
official code's shortcut): a per-batch draw (stochastic depth's block-mode gate,
DropBlock's batch rescaling) is then independent between the passes too, as the
definition asks. Batch norm layers see each batch twice, so their running statistics take
two momentum updates per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regdrop.methods.base import DropModule, SurgeryReport, refuse_reapply
from regdrop.methods.method import Loss, Method

__all__ = ["METHOD", "RDropOptions", "apply_rdrop", "rdrop_loss", "symmetric_kl"]

# Bases whose two passes would not be two sub-models R-Drop can compare.
REFUSED_BASES = {
    "none": "it has no masks, so both passes are the same network",
    "gyro": "its masks are fixed within a step (preselected subnetworks), so both passes are the same sub-model",
    "multisample": "its logits are M x B x C copies; use it alone",
    "rdrop": "R-Drop cannot be its own base",
}


@dataclass
class RDropOptions:
    """The options of R-Drop (the keys of ``conf/dropout/rdrop.yaml``)."""

    alpha: float = 0.3  # weight of the symmetric KL; the official ViT code's default
    base: str = "standard"  # the method whose masks the two passes draw
    base_options: dict[str, Any] = field(default_factory=dict)  # its options (its defaults otherwise)
    seed: int | None = None  # the base's seed (null: the run's seed)


def check(options: RDropOptions) -> None:
    """Raise `ValueError` (starting with the option's name) for a bad option; needs no model."""
    from regdrop.errors import ConfigError
    from regdrop.methods import REGISTRY, check_method

    if not options.alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (0 is two-pass training without the KL term), got {options.alpha}")
    if options.base in REFUSED_BASES:
        raise ValueError(f"base {options.base!r} cannot carry R-Drop: {REFUSED_BASES[options.base]}")
    if options.base not in REGISTRY:
        valid = ", ".join(m for m in REGISTRY if m not in REFUSED_BASES)
        raise ValueError(f"base must be a method with masks, one of: {valid}; got {options.base!r}")
    try:
        check_method({"name": options.base, **options.base_options})
    except ConfigError as err:
        raise ValueError(f"base_options: for base {options.base!r}, {err}") from None


def apply_rdrop(model: nn.Module, **options: Any) -> SurgeryReport:
    """Install R-Drop's base method in ``model`` (`RDropOptions`: ``alpha=0.3,
    base="standard", base_options={}, seed=None``); the two passes and the loss are
    `rdrop_loss`, run by the trainer through the method's ``forward_loss`` hook."""
    from regdrop.methods import apply_method

    chosen = RDropOptions(**options)
    check(chosen)
    refuse_reapply(model, DropModule, "apply_rdrop")  # before the base's surgery, whatever it is
    base = {"name": chosen.base, **chosen.base_options}
    report = apply_method(model, base, seed=chosen.seed if chosen.seed is not None else 0)
    report.method = "rdrop"
    report.notes.append(f"R-Drop: two passes a step through {chosen.base}, KL weight alpha={chosen.alpha}")
    return report


def symmetric_kl(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """``(KL(P1 || P2) + KL(P2 || P1)) / 2`` of the softmax distributions of two ``B x C``
    logits, summed over the classes and averaged over the batch, in float32 at least (half-
    precision logits of autocast are promoted)."""
    dtype = torch.promote_types(logits1.dtype, torch.float32)
    log1, log2 = F.log_softmax(logits1.to(dtype), -1), F.log_softmax(logits2.to(dtype), -1)
    kl12 = F.kl_div(log2, log1, log_target=True, reduction="none").sum(-1)  # KL(P1 || P2)
    kl21 = F.kl_div(log1, log2, log_target=True, reduction="none").sum(-1)  # KL(P2 || P1)
    return ((kl12 + kl21) / 2).mean()


def rdrop_loss(logits1: torch.Tensor, logits2: torch.Tensor, targets: torch.Tensor, loss: Loss,
               alpha: float) -> torch.Tensor:
    """Half the paper's Eq. 3: the mean of the two passes' losses plus ``alpha / 2`` times the
    symmetric KL (`symmetric_kl`); ``loss(logits, targets)`` is one pass's loss."""
    return (loss(logits1, targets) + loss(logits2, targets)) / 2 + alpha / 2 * symmetric_kl(logits1, logits2)


def forward_loss(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: Loss,
                 options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Two forward passes of ``inputs`` with independent masks; returns the first pass's
    logits (for the training accuracy) and `rdrop_loss`."""
    logits1, logits2 = net(inputs), net(inputs)
    return logits1, rdrop_loss(logits1, logits2, targets, loss, options["alpha"])


METHOD = Method("rdrop", RDropOptions, apply_rdrop, check, forward_loss=forward_loss)
