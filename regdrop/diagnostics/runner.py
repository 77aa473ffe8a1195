"""The ``diagnostics`` config section and `Diagnostics`, the object the training loop asks
when to measure and what (the measurements are in the package's other modules).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from regdrop.diagnostics.calibration import plot_reliability
from regdrop.diagnostics.ensembles import evaluate_predictions
from regdrop.diagnostics.gradients import Batch, LossFn, measure_gradients
from regdrop.diagnostics.preservation import preserved_state
from regdrop.errors import ConfigError, check_keys, check_number
from regdrop.methods import begin_step, training_loss
from regdrop.rng import stream_generator, stream_seed

KEYS = (
    "name", "every", "until", "batches", "reference_batches", "mc_samples",
    "gyro_subnetworks", "calibration_bins",
)


GYRO_SUBNETWORKS = ("tau", "sigma")


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
