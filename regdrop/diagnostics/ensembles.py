"""Predictions of the deterministic model and of an MC-dropout ensemble (Gal &
Ghahramani, ICML 2016; a method's own members, such as Gyro's subnetworks, where it
declares them): accuracy, negative log-likelihood and calibration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from regdrop.diagnostics.calibration import Calibration
from regdrop.diagnostics.gradients import Batch
from regdrop.diagnostics.preservation import drop_layers, preserved_state
from regdrop.methods import ensemble_members
from regdrop.methods.gyro import GyroDropout


@dataclass
class Evaluation:
    """Accuracy, mean negative log-likelihood and calibration of a set of predictions."""

    acc: float
    nll: float
    calibration: Calibration
    members: int  # forward passes averaged per sample (0: deterministic)


def _log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``B x C`` log-probabilities; ``M x B x C`` multi-sample logits average their copies'
    probabilities (each copy is one dropout sample)."""
    log_p = logits.float().log_softmax(-1)
    if log_p.ndim == 3:
        log_p = torch.logsumexp(log_p, 0) - math.log(log_p.shape[0])
    return log_p


def gyro_members(model: nn.Module, which: str = "tau") -> list[list[int]]:
    """The subnetworks of a model's `GyroDropout` layers (gyro's ensemble hook,
    `regdrop.methods.ensemble_members`): one bank index per layer each."""
    return ensemble_members(model, "gyro", which)


@torch.no_grad()
def evaluate_predictions(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    samples: int = 0,
    gyro: str | None = None,
    bins: int = 15,
    max_batches: int | None = None,
    seed: int | None = None,
) -> Evaluation:
    """Deterministic (``samples=0``) or MC-dropout evaluation of ``model`` on ``loader``.

    MC: the model in evaluation mode with its drop layers in training mode, the softmax
    averaged over ``samples`` forward passes per batch (for a model with gyro layers and
    ``gyro`` set, over its subnetworks instead, see `gyro_members`). The NLL is that of the
    averaged probabilities, computed in log space (``logsumexp``), so one pass gives exactly
    the deterministic numbers when the drop layers are the identity (rate 0). Runs under
    `preserved_state`: the model and the RNGs are left as they were.
    """
    device = next(model.parameters()).device
    calibration = Calibration.empty(bins)
    nll_sum, correct_sum, count, members = 0.0, 0, 0, 0
    with preserved_state(model, seed):
        model.eval()
        layers = drop_layers(model) if samples > 0 else []
        for layer in layers:
            layer.train()
        gyros = [m for m in layers if isinstance(m, GyroDropout)]
        passes: list[list[int] | None] = [None] * max(samples, 1)
        if gyros and gyro is not None:
            passes = gyro_members(model, gyro)
        for index, (x, y) in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            log_mean = None
            for member in passes:
                if member is not None:
                    for layer, row in zip(gyros, member, strict=True):
                        layer.selection = torch.tensor([row], device=layer.selection.device)
                log_p = _log_probabilities(model(x))
                log_mean = log_p if log_mean is None else torch.logaddexp(log_mean, log_p)
            log_mean = log_mean - math.log(len(passes)) if len(passes) > 1 else log_mean
            top_log_p, predicted = log_mean.max(-1)
            correct = predicted == y
            nll_sum += float(-log_mean.gather(1, y.view(-1, 1)).sum())
            correct_sum += int(correct.sum())
            count += len(y)
            calibration.add(top_log_p.exp(), correct)
        members = len(passes) if samples > 0 else 0
    if count == 0:
        raise ValueError("evaluate_predictions got no test batch")
    return Evaluation(correct_sum / count, nll_sum / count, calibration, members)
