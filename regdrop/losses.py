"""The training loss (config ``loss`` group): label smoothing and batch mixing.

The early-dropout recipe (Liu et al., ICML 2023, on the DeiT / ConvNeXt training code)
trains with mixup (alpha 0.8) and CutMix (alpha 1.0), one of the two per batch (switch
probability 0.5), and label smoothing 0.1. regdrop does it as that code does, with timm's
own pieces:

* mixing on (``mixup_alpha`` or ``cutmix_alpha`` > 0): timm's `Mixup` mixes every
  (micro-)batch on the device after it is loaded, pairing sample ``i`` with sample
  ``B - 1 - i``; label smoothing is folded into its soft targets (timm's `mixup_target`),
  and the loss is timm's `SoftTargetCrossEntropy` on ``B x C`` targets;
* no mixing, ``label_smoothing`` > 0: timm's `LabelSmoothingCrossEntropy`;
* neither: plain cross-entropy.

Evaluation always scores the clean test set with plain cross-entropy and hard labels.

timm's `Mixup` draws its mixing weight, its mixup/CutMix switch and its box from numpy's
global generator. `BatchMixer` seeds that generator from ``(seed, optimizer step,
micro-batch, rank)`` for the call and puts the global state back afterwards, so the
mixing of every batch is a pure function of where it sits in the run (a resumed run mixes
as one that never stopped) and nothing else that draws from numpy is disturbed. As in the
official code, each data-parallel rank mixes its own slice with its own weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from regdrop.errors import ConfigError, check_keys, check_number
from regdrop.rng import seeded_global_state, stream_seed

LOSS_KEYS = ("label_smoothing", "mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "mix_mode")
MIX_MODES = ("batch", "pair", "elem")  # timm's: one weight per batch, per pair, per sample
# The section a config without a ``loss`` group gets: plain cross-entropy.
PLAIN = {"label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0,
         "switch_prob": 0.5, "mix_mode": "batch"}


def _section(cfg: Mapping | None) -> dict:
    return dict(PLAIN) if cfg is None else {**PLAIN, **dict(cfg)}


def check_loss(cfg: Mapping | None) -> None:
    """Check the config ``loss`` section (null: plain cross-entropy): keys and values."""
    if cfg is None:
        return
    check_keys(cfg, "loss", LOSS_KEYS)
    options = _section(cfg)
    check_number(options["label_smoothing"], "loss.label_smoothing", minimum=0)
    if options["label_smoothing"] >= 1:
        raise ConfigError("loss.label_smoothing", f"must be in [0, 1), got {options['label_smoothing']!r}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        check_number(options[key], f"loss.{key}", minimum=0)
    for key in ("mix_prob", "switch_prob"):
        check_number(options[key], f"loss.{key}", minimum=0)
        if options[key] > 1:
            raise ConfigError(f"loss.{key}", f"is a probability: must be in [0, 1], got {options[key]!r}")
    if options["mix_mode"] not in MIX_MODES:
        raise ConfigError("loss.mix_mode", f"unknown mode {options['mix_mode']!r}; valid: {', '.join(MIX_MODES)} "
                          "(timm's Mixup: one weight per batch, per pair of samples, or per sample)")


def mixes(cfg: Mapping | None) -> bool:
    """Whether the ``loss`` section mixes batches (mixup or CutMix on)."""
    options = _section(cfg)
    return options["mixup_alpha"] > 0 or options["cutmix_alpha"] > 0


def describe_loss(cfg: Mapping | None) -> str:
    """One line for the run's header: the loss and the batch mixing it trains with."""
    options = _section(cfg)
    smoothing = options["label_smoothing"]
    if not mixes(cfg):
        return f"cross-entropy, label smoothing {smoothing:g}" if smoothing else "cross-entropy"
    parts = [f"{name} alpha {options[key]:g}" for name, key in (("mixup", "mixup_alpha"), ("CutMix", "cutmix_alpha"))
             if options[key] > 0]
    both = options["mixup_alpha"] > 0 and options["cutmix_alpha"] > 0
    switch = f", CutMix with probability {options['switch_prob']:g}" if both else ""
    return (f"soft-target cross-entropy on {' / '.join(parts)} (mixed with probability "
            f"{options['mix_prob']:g}{switch}, per {options['mix_mode']}), label smoothing {smoothing:g}")


class BatchMixer:
    """timm's `Mixup` with its numpy draws seeded per (step, micro-batch, rank).

    ``mixer(x, y, step, micro)`` returns the mixed images (``x`` is mixed in place) and
    the ``B x C`` soft targets of the class indices ``y``.
    """

    def __init__(self, mixup: Mixup, seed: int, rank: int = 0) -> None:
        self.mixup, self.seed, self.rank = mixup, seed, rank

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        with seeded_global_state(stream_seed(self.seed, "loss.mix", step, micro, self.rank)):
            return self.mixup(x, y)

    def __repr__(self) -> str:
        m = self.mixup
        return (f"BatchMixer(mixup_alpha={m.mixup_alpha}, cutmix_alpha={m.cutmix_alpha}, prob={m.mix_prob}, "
                f"switch_prob={m.switch_prob}, mode={m.mode}, label_smoothing={m.label_smoothing})")


@dataclass
class Loss:
    """What `train_step` trains with: the loss of ``(logits, targets)`` and the batch mixer
    (None: batches are used as loaded, targets stay class indices)."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mix: BatchMixer | None


def build_loss(cfg: Mapping | None, num_classes: int, *, seed: int = 0, rank: int = 0) -> Loss:
    """The loss and batch mixer of the config ``loss`` section, for ``num_classes`` classes."""
    check_loss(cfg)
    options = _section(cfg)
    smoothing = float(options["label_smoothing"])
    if mixes(cfg):
        mixup = Mixup(
            mixup_alpha=float(options["mixup_alpha"]), cutmix_alpha=float(options["cutmix_alpha"]),
            prob=float(options["mix_prob"]), switch_prob=float(options["switch_prob"]),
            mode=options["mix_mode"], label_smoothing=smoothing, num_classes=num_classes,
        )
        return Loss(SoftTargetCrossEntropy(), BatchMixer(mixup, seed, rank))
    if smoothing > 0:
        return Loss(LabelSmoothingCrossEntropy(smoothing=smoothing), None)
    return Loss(F.cross_entropy, None)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices of ``targets``: themselves, or the argmax of ``B x C`` soft targets
    (a mixed sample counts as its larger part)."""
    return targets.argmax(-1) if targets.ndim > 1 else targets
