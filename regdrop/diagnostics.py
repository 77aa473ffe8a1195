"""Diagnostics of a run: what a dropout method does to training and to the trained model.

Three measurements, all off by default (config group ``diagnostics``, option ``none``):

* **Gradient direction variance and error** (Liu et al., "Dropout Reduces Underfitting",
  ICML 2023). At chosen optimizer steps, the flattened gradients ``g_1 .. g_K`` of the
  training loss on ``K`` random training batches are taken with the drop layers active, as
  in training. GDV is the mean pairwise cosine distance ``1 - cos(g_i, g_j)`` over the
  ``K (K - 1) / 2`` pairs; GDE is the mean cosine distance of each ``g_k`` to the gradient
  of the whole training set (or of a fixed random subset of it, ``reference_batches``)
  taken with the drop layers in evaluation mode (dropout off). Beside them: the mean
  gradient norm over the ``K`` batches, the norm of the reference gradient, and the L2
  distance of the weights from their values when `Diagnostics` was built (the paper's
  "model distance").

  *BatchNorm* stays in training mode (batch statistics) for both the mini-batch and the
  reference gradients: they are then the gradients of the loss the optimizer follows (the
  reference differs only in having dropout off), and a model without dropout gets a GDE
  that measures mini-batch sampling alone. The running statistics those passes update are
  restored afterwards.

* **MC dropout** (Gal & Ghahramani, ICML 2016): the test accuracy and negative
  log-likelihood of the average of the softmax over ``S`` stochastic forward passes with
  the drop layers in training mode and everything else (BatchNorm) in evaluation mode, at
  the drop rate in force. Gyro dropout (Lee et al., MLSys 2022) is deterministic given its
  active masks, so for a model with `GyroDropout` layers the ensemble is its subnetworks
  instead: the ``tau`` active ones, or the ``sigma`` trained most recently (``tau`` per
  period over the last ``sigma // tau`` periods; with one gyro layer and the default
  selection without replacement, after a full cycle, exactly the bank). Each subnetwork
  sees the whole test set.

* **Calibration** (Guo et al., ICML 2017): the expected calibration error over
  ``calibration_bins`` equal-width bins ``((b-1)/n, b/n]`` of top-1 confidence, for the
  deterministic and the MC predictions, and a reliability diagram (PNG) of both.
  ECE is computed here from the per-bin sums that the diagram needs anyway (a few tensor
  lines, streaming over test batches), not with torchmetrics, whose
  ``MulticlassCalibrationError`` returns the number but not the bins: the diagram would
  have to recompute them, and two codes for one value is one too many.

**Measuring changes nothing.** `Diagnostics.measure` and `Diagnostics.evaluate` leave
training exactly as it would have been (same losses, bit for bit, on the CPU): they run
inside `preserved_state`, which restores torch's global random generators (and Python's
and NumPy's), every buffer of the model (BatchNorm statistics, drop layers' selections),
the extra state of every module that has one (the drop layers' own generators), and every
module's training flag; gradients go into separate tensors (`torch.autograd.grad`), never
into ``.grad``; the batches come from a seeded sampler of their own over the training
tensors, not from the training iterator, and their augmentation from a stream of their
own. Their randomness is a function of the run's seed and the step alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from regdrop.errors import ConfigError, check_keys, check_number
from regdrop.methods import begin_step, ensemble_members, training_loss
from regdrop.methods.base import DropModule
from regdrop.methods.gyro import GyroDropout
from regdrop.rng import seeded_global_state, stream_generator, stream_seed

KEYS = (
    "name", "every", "until", "batches", "reference_batches", "mc_samples",
    "gyro_subnetworks", "calibration_bins",
)
GYRO_SUBNETWORKS = ("tau", "sigma")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

# -- cosine distances ----------------------------------------------------------------------


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a . b`` accumulated in float64 (a gradient has millions of terms)."""
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())


def _distance(dot: torch.Tensor, square_a: torch.Tensor, square_b: torch.Tensor) -> torch.Tensor:
    # sqrt(|a|^2 |b|^2) rather than |a| |b|: for a == b it is exactly |a|^2 (IEEE sqrt of a
    # square), so identical vectors are at distance exactly 0.
    cosine = (dot / torch.sqrt(square_a * square_b)).clamp(-1.0, 1.0)
    return 1.0 - cosine


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` of two tensors taken as flat vectors, as a 0-d float64 tensor.

    0 for parallel vectors (exactly, for identical ones), 1 for orthogonal ones, 2 for
    opposite ones; NaN when either vector is zero (no direction).
    """
    if a.numel() != b.numel():
        raise ValueError(f"cosine_distance needs vectors of one size, got {a.numel()} and {b.numel()}")
    return _distance(_dot(a, b), _dot(a, a), _dot(b, b))


def gradient_direction_variance(grads: Sequence[torch.Tensor]) -> float:
    """Liu et al.'s GDV: the mean cosine distance over all pairs of the ``K >= 2`` gradients."""
    if len(grads) < 2:
        raise ValueError(f"gradient direction variance needs at least 2 gradients, got {len(grads)}")
    squares = [_dot(g, g) for g in grads]
    distances = [
        _distance(_dot(grads[i], grads[j]), squares[i], squares[j])
        for i in range(len(grads)) for j in range(i + 1, len(grads))
    ]
    return float(torch.stack(distances).mean())


def gradient_direction_error(grads: Sequence[torch.Tensor], reference: torch.Tensor) -> float:
    """Liu et al.'s GDE: the mean cosine distance of each gradient to ``reference``
    (the whole-training-set gradient with dropout off)."""
    if len(grads) < 1:
        raise ValueError("gradient direction error needs at least 1 gradient")
    square_ref = _dot(reference, reference)
    distances = [_distance(_dot(g, reference), _dot(g, g), square_ref) for g in grads]
    return float(torch.stack(distances).mean())


# -- leaving no trace ------------------------------------------------------------------------


def drop_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose training mode means "dropout on": regdrop's drop layers and torch's
    own dropout modules (left in a model regdrop did not build)."""
    return [m for m in model.modules() if isinstance(m, DropModule | nn.modules.dropout._DropoutNd)]


def _has_extra_state(module: nn.Module) -> bool:
    return type(module).get_extra_state is not nn.Module.get_extra_state


def _same(a: Any, b: Any) -> bool:
    """Deep equality of extra states (dicts, sequences, tensors, plain values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _cuda_devices(model: nn.Module) -> list[int]:
    devices = {t.device for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"}
    return sorted(d.index if d.index is not None else torch.cuda.current_device() for d in devices)


@contextlib.contextmanager
def preserved_state(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Run the block, then put back everything of ``model`` and of the RNGs it may touch.

    Restored: torch's CPU generator and those of the CUDA devices the model is on, Python's
    and NumPy's generators; every buffer of the model (values, and the tensor object itself
    when the block replaced it: BatchNorm statistics, Gyro's bank and selection); the extra
    state of every module that has one (drop layers' generators, Gyro's step), set back only
    when it changed; every module's training flag. With ``seed``, those generators are
    seeded with it inside the block (`regdrop.rng.seeded_global_state`), so what the block draws does not depend on training.
    Parameters and their ``.grad`` are not saved: the block must leave them alone.
    """
    buffers = [
        (module, name, tensor, tensor.detach().clone())
        for module in model.modules()
        for name, tensor in module.named_buffers(recurse=False)
    ]
    extra = [(m, copy.deepcopy(m.get_extra_state())) for m in model.modules() if _has_extra_state(m)]
    modes = [(m, m.training) for m in model.modules()]
    devices = _cuda_devices(model)
    try:
        with seeded_global_state(seed, cuda_devices=devices):
            yield
    finally:
        with torch.no_grad():
            for module, name, original, saved in buffers:
                if original.shape != saved.shape:
                    original.data = saved
                elif not torch.equal(original, saved):
                    original.copy_(saved)
                if getattr(module, name) is not original:
                    setattr(module, name, original)
        for module, state in extra:
            if not _same(module.get_extra_state(), state):
                module.set_extra_state(state)
        for module, training in modes:
            module.training = training


# -- gradients -------------------------------------------------------------------------------


def _flat_gradient(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, batch: Batch) -> tuple[torch.Tensor, int]:
    device = params[0].device
    x, y = batch[0].to(device), batch[1].to(device)
    loss = loss_fn(model(x).float(), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
        for g, p in zip(grads, params, strict=True)
    ])
    return flat, len(y)


def weight_distance(model: nn.Module, initial: Sequence[torch.Tensor]) -> float:
    """The L2 distance of the trainable parameters of ``model`` from ``initial`` (same order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(initial):
        raise ValueError(f"model has {len(params)} trainable parameters, initial values {len(initial)}")
    total = sum(((p.detach().double() - p0.double()) ** 2).sum() for p, p0 in zip(params, initial, strict=True))
    return float(torch.as_tensor(total).sqrt())


def measure_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    reference: Iterable[Batch],
    *,
    initial: Sequence[torch.Tensor] | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """GDV, GDE and gradient norms of ``model`` (Liu et al. 2023), leaving it as it was.

    ``batches``: the ``K >= 2`` training batches of the mini-batch gradients, taken with the
    model in training mode (drop layers active). ``reference``: batches covering the data of
    the reference gradient (the mean loss over all their samples), taken with the drop
    layers in evaluation mode and the rest (BatchNorm) in training mode. ``loss_fn`` maps
    (logits, labels) to a mean loss (`multisample_loss` handles ``M x B x C`` logits).
    ``initial``: the initial trainable parameters, for ``weight_distance``. ``seed`` seeds
    the dropout masks drawn here. Everything is run under `preserved_state`.

    Returns ``gdv``, ``gde``, ``grad_norm`` (mean over the ``K`` batches), ``reference_grad_norm``
    and, with ``initial``, ``weight_distance``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved_state(model, seed), torch.enable_grad():
        model.train()
        grads = [_flat_gradient(model, params, loss_fn, batch)[0] for batch in batches]
        for layer in drop_layers(model):
            layer.eval()
        total, count = None, 0
        for batch in reference:
            flat, size = _flat_gradient(model, params, loss_fn, batch)
            # Weighted by batch size: the gradient of the mean loss over every sample.
            total = flat.double() * size if total is None else total.add_(flat.double(), alpha=size)
            count += size
    if total is None:
        raise ValueError("measure_gradients needs at least one reference batch")
    reference_grad = total / count
    result = {
        "gdv": gradient_direction_variance(grads),
        "gde": gradient_direction_error(grads, reference_grad),
        "grad_norm": float(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).mean()),
        "reference_grad_norm": float(torch.linalg.vector_norm(reference_grad)),
    }
    if initial is not None:
        result["weight_distance"] = weight_distance(model, initial)
    return result


# -- predictions and calibration ---------------------------------------------------------------


@dataclass
class Calibration:
    """Per-bin sums of top-1 confidence and correctness over equal-width bins of (0, 1]."""

    counts: torch.Tensor        # samples per bin
    confidence: torch.Tensor    # sum of top-1 confidences per bin
    correct: torch.Tensor       # number of correct top-1 predictions per bin

    @classmethod
    def empty(cls, bins: int) -> Calibration:
        zeros = torch.zeros(bins, dtype=torch.float64)
        return cls(zeros.clone(), zeros.clone(), zeros.clone())

    @property
    def bins(self) -> int:
        return len(self.counts)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Add samples: their top-1 ``confidence`` in (0, 1] and whether they were ``correct``."""
        confidence = confidence.detach().double().cpu()
        # Bin b holds ((b-1)/n, b/n] (Guo et al.): bucketize against the inner edges.
        edges = torch.linspace(0.0, 1.0, self.bins + 1, dtype=torch.float64)[1:-1]
        index = torch.bucketize(confidence, edges, right=False)
        self.counts.index_add_(0, index, torch.ones_like(confidence))
        self.confidence.index_add_(0, index, confidence)
        self.correct.index_add_(0, index, correct.detach().double().cpu())

    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy - confidence| x bin share."""
        total = self.counts.sum()
        return float((self.correct - self.confidence).abs().sum() / total) if total > 0 else math.nan

    def accuracy_per_bin(self) -> torch.Tensor:
        return self.correct / self.counts.clamp_min(1)

    def confidence_per_bin(self) -> torch.Tensor:
        return self.confidence / self.counts.clamp_min(1)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of ``B x C`` logits against ``labels``: top-1 confidence, ``bins`` equal-width bins."""
    probabilities = logits.float().softmax(-1)
    confidence, predicted = probabilities.max(-1)
    calibration = Calibration.empty(bins)
    calibration.add(confidence, predicted == labels)
    return calibration.ece()


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


def plot_reliability(curves: Mapping[str, Calibration], path: str | Path) -> Path:
    """A reliability diagram per calibration, side by side, into one PNG (matplotlib Agg)."""
    from regdrop.plots import plt  # sets the Agg backend

    panels = len(curves)
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.4), dpi=120, squeeze=False)
    for ax, (label, calibration) in zip(axes[0], curves.items(), strict=True):
        bins = calibration.bins
        centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
        filled = calibration.counts > 0
        accuracy = calibration.accuracy_per_bin()
        confidence = calibration.confidence_per_bin()
        ax.bar(centres[filled], accuracy[filled], width=1.0 / bins, color="tab:blue",
               edgecolor="white", label="accuracy")
        ax.bar(centres[filled], (confidence - accuracy)[filled], bottom=accuracy[filled],
               width=1.0 / bins, color="tab:red", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
        ax.set_title(f"{label}: ECE {calibration.ece():.4f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the config section and the training-loop object -----------------------------------------


def check_diagnostics(section: Mapping) -> None:
    """Raise `ConfigError` (``diagnostics.<key>``) for a bad config ``diagnostics`` section."""
    name = section.get("name") if isinstance(section, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ConfigError("diagnostics.name", f"must be a name (none turns diagnostics off), got {name!r}")
    if name == "none":
        extra = [k for k in section if k != "name"]
        if extra:
            raise ConfigError(f"diagnostics.{extra[0]}", "diagnostics=none takes no options; "
                              "pick diagnostics=liu (or another option file) to set them")
        return
    check_keys(section, "diagnostics", KEYS)
    missing = [k for k in KEYS if k not in section]
    if missing:
        raise ConfigError(f"diagnostics.{missing[0]}", f"missing; the section needs {', '.join(KEYS)}")
    every = section["every"]
    if isinstance(every, list | tuple) or type(every).__name__ == "ListConfig":
        if len(every) == 0:
            raise ConfigError("diagnostics.every", "an empty list of steps; use null for no gradient diagnostics")
        for step in every:
            check_number(step, "diagnostics.every", integer=True, minimum=0)
    else:
        check_number(every, "diagnostics.every", integer=True, minimum=1, optional=True)
    check_number(section["until"], "diagnostics.until", integer=True, minimum=0, optional=True)
    check_number(section["batches"], "diagnostics.batches", integer=True, minimum=2)
    check_number(section["reference_batches"], "diagnostics.reference_batches", integer=True,
                 minimum=1, optional=True)
    check_number(section["mc_samples"], "diagnostics.mc_samples", integer=True, minimum=0)
    check_number(section["calibration_bins"], "diagnostics.calibration_bins", integer=True, minimum=1)
    if section["gyro_subnetworks"] not in GYRO_SUBNETWORKS:
        raise ConfigError("diagnostics.gyro_subnetworks",
                          f"must be one of {', '.join(GYRO_SUBNETWORKS)}, got {section['gyro_subnetworks']!r}")


def train_test_gap(train: Mapping[str, float], test: Mapping[str, float]) -> dict[str, float]:
    """``gap/acc`` = train - test accuracy and ``gap/loss`` = test - train loss, from the
    last epoch's means (``train/epoch_acc``, ``train/epoch_loss``) and an evaluation
    (``test/acc``, ``test/loss``): both positive when the model does better on its training
    data (over-fitting), near 0 or negative when it under-fits."""
    return {"gap/acc": train["train/epoch_acc"] - test["test/acc"],
            "gap/loss": test["test/loss"] - train["train/epoch_loss"]}


class Diagnostics:
    """The diagnostics a training loop runs, built from the config ``diagnostics`` section.

    Build it after the method's surgery and before the first optimizer step (it keeps the
    initial weights). In the loop, before optimizer step ``step`` (run at drop-rate factor
    ``factor``): ``if diag.due(step): log(diag.measure(step, model, factor=factor))``; at
    the end ``summary |= diag.evaluate(model, data.test, output_dir)``. Pass the uncompiled
    model. With ``name: none`` nothing is due and `evaluate` returns {}.

    ``data`` is the run's `regdrop.data.Data`: the batches come from ``data.train``'s tensors
    (a `TensorLoader`) through a sampler of their own; for a torch ``DataLoader`` (ImageNet)
    they are read sample by sample from its dataset in this process, which is slow for the
    whole training set: set ``reference_batches`` there. ``batch_size`` is the size of a
    mini-batch (default: the training loader's; pass ``batch_size * grad_accum`` to measure
    the gradient of a whole optimizer step).
    """

    def __init__(self, section: Mapping, model: nn.Module, data: Any, *, seed: int = 0,
                 batch_size: int | None = None) -> None:
        check_diagnostics(section)
        self.enabled = section["name"] != "none"
        self.seed = int(seed)
        get = section.get
        every = get("every")
        self.steps = None if every is None or isinstance(every, int) else {int(s) for s in every}
        self.every = every if isinstance(every, int) else None
        self.until = get("until")
        self.batches = get("batches", 0)
        self.reference_batches = get("reference_batches")
        self.mc_samples = get("mc_samples", 0)
        self.gyro_subnetworks = get("gyro_subnetworks", "tau")
        self.bins = get("calibration_bins", 15)
        self.loader = data.train
        self.batch_size = int(batch_size or self.loader.batch_size)
        self.num_train = len(self.loader.labels) if self._tensors() else len(self.loader.dataset)
        self.initial: list[torch.Tensor] = []
        if self.enabled and (self.every is not None or self.steps):
            for key, count in (("batches", self.batches), ("reference_batches", self.reference_batches or 0)):
                if count * self.batch_size > self.num_train:
                    raise ConfigError(f"diagnostics.{key}", f"{count} batches of {self.batch_size} "
                                      f"exceed the {self.num_train} training images")
            self.initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    # -- gradients -----------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether `measure` should run at optimizer step ``step`` (counted from 0)."""
        if not self.enabled or (self.until is not None and step > self.until):
            return False
        if self.steps is not None:
            return step in self.steps
        return self.every is not None and step % self.every == 0

    def measure(self, step: int, model: nn.Module, loss_fn: LossFn = training_loss,
                factor: float | None = None) -> dict[str, float]:
        """``diag/gdv``, ``diag/gde``, ``diag/grad_norm``, ``diag/reference_grad_norm`` and
        ``diag/weight_distance`` of ``model`` at ``step``; training is left untouched.

        With ``factor`` (the step's drop-rate factor), the drop layers are first put in the
        state of ``step`` (`regdrop.methods.begin_step`: its rate, Gyro's selection), as the
        training step will put them; that too is undone afterwards. Without it they are
        measured as they are.
        """
        if not self.initial:
            return {}
        n = self.num_train
        order = torch.randperm(n, generator=stream_generator(self.seed, "diagnostics.batches", step))
        batches = [order[k * self.batch_size:(k + 1) * self.batch_size] for k in range(self.batches)]
        if self.reference_batches is None:
            chosen = torch.arange(n)
        else:
            chosen = torch.randperm(n, generator=stream_generator(self.seed, "diagnostics.reference"))
            chosen = chosen[: self.reference_batches * self.batch_size]
        reference = list(chosen.split(self.batch_size))
        with preserved_state(model):
            if factor is not None:
                begin_step(model, step, factor)
            values = measure_gradients(
                model, loss_fn, self._read(batches, step, 0), self._read(reference, step, len(batches)),
                initial=self.initial, seed=stream_seed(self.seed, "diagnostics.dropout", step),
            )
        return {f"diag/{key}": value for key, value in values.items()}

    def _tensors(self) -> bool:
        return hasattr(self.loader, "images") and hasattr(self.loader, "_prepare")

    def _read(self, index_batches: list[torch.Tensor], step: int, first: int) -> Iterator[Batch]:
        for number, index in enumerate(index_batches, start=first):
            if self._tensors():
                # The training loader's own normalisation and augmentation. Its augmentation
                # is a function of (epoch, batch); training's epochs are never negative, so
                # "epoch" -1 - step is a stream of the diagnostics' own.
                x = self.loader._prepare(self.loader.images[index], -1 - step, number)
                yield x, self.loader.labels[index]
            else:
                # A DataLoader's transforms draw from the global RNG, which `preserved_state`
                # seeds and restores.
                dataset = self.loader.dataset
                yield default_collate([dataset[int(i)] for i in index])

    def state_dict(self) -> dict[str, Any]:
        """The initial weights behind ``diag/weight_distance``: a resumed run must keep them."""
        return {"initial": [t.clone() for t in self.initial]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial = [t.clone() for t in state["initial"]]

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self, model: nn.Module, test_loader: Iterable[Batch] | DataLoader,
                 folder: str | Path | None = None, max_batches: int | None = None) -> dict[str, float]:
        """``test/ece`` and, with ``mc_samples > 0``, ``mc/test_acc``, ``mc/test_nll``,
        ``mc/test_ece`` and ``mc/members``; writes ``reliability.png`` into ``folder``."""
        if not self.enabled:
            return {}
        common = {"bins": self.bins, "max_batches": max_batches, "seed": stream_seed(self.seed, "diagnostics.dropout")}
        deterministic = evaluate_predictions(model, test_loader, **common)
        result = {"test/ece": deterministic.calibration.ece()}
        curves = {"deterministic": deterministic.calibration}
        if self.mc_samples > 0:
            mc = evaluate_predictions(model, test_loader, samples=self.mc_samples,
                                      gyro=self.gyro_subnetworks, **common)
            result.update({"mc/test_acc": mc.acc, "mc/test_nll": mc.nll,
                           "mc/test_ece": mc.calibration.ece(), "mc/members": mc.members})
            curves[f"MC dropout ({mc.members} passes)"] = mc.calibration
        if folder is not None:
            plot_reliability(curves, Path(folder) / "reliability.png")
        return result
