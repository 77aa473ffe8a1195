"""Whole training steps: each method through the trainer's own `regdrop.train.train_step`,
against the same model with no method and against a bare hand-written PyTorch loop.

For each model every candidate starts from a copy of the same initial weights, gets its own
optimizer and LR schedule (the default config's, ``optim=sgd`` and ``lr=cosine``: SGD with
Nesterov momentum, no weight decay on norms and biases), and cycles through the same few
batches held on the device (no loader: the data cost is measured apart, in `regdrop.bench.data`). The
bare loop is what one would write by hand: forward, cross-entropy, backward, optimizer and
LR-schedule step, zero the gradients. ``none`` against ``bare loop`` is therefore the
framework's own cost per step (the method hooks, the loss and accuracy kept on the device,
the scaler and autocast wrappers).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from regdrop import train as training
from regdrop.bench.report import Comparison
from regdrop.bench.timing import Candidate, measure, say, synchronizer
from regdrop.data import DataInfo
from regdrop.errors import ConfigError
from regdrop.methods import REGISTRY, apply_method, setup_run
from regdrop.models import build_model
from regdrop.optim import build_lr_schedule, build_optimizer
from regdrop.runtime import Runtime

# The config tree `train.py` composes: every section here is a file of it, so the benchmark
# runs what a user runs (the default optimizer and LR schedule, each method's defaults).
CONF = Path(__file__).resolve().parents[2] / "conf"
# A run length for the LR schedule and gyro's periods, longer than any benchmark.
TOTAL_STEPS = 100_000


def config(group: str, name: str, **overrides) -> DictConfig:
    """Config section ``conf/<group>/<name>.yaml`` with ``overrides`` (``group=name key=value``)."""
    path = CONF / group / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: regdrop.bench reads the project's conf/ tree")
    loaded = OmegaConf.load(path)
    loaded.pop("defaults", None)  # a conf/dropout file's schema: the section itself is the rest
    return OmegaConf.merge(loaded, overrides)


def optimizer_and_schedule(model: nn.Module):
    """The default config's optimizer (``optim=sgd``) and LR schedule (``lr=cosine``)."""
    optimizer = build_optimizer(config("optim", "sgd"), model)
    schedule = build_lr_schedule(config("lr", "cosine"), optimizer, TOTAL_STEPS, TOTAL_STEPS)
    return optimizer, schedule


# (label, method, overrides of conf/dropout/<method>.yaml): every registered method at its
# config file's values (regdrop.methods.REGISTRY, so a new method is benchmarked without a
# word here), plus variants at the papers' settings: multi-sample with one copy against
# eight, block-wise stochastic depth at Huang et al.'s linear 0.5, sample-wise at
# Composer's card's 0.1.
VARIANTS: dict[str, tuple[tuple[str, dict], ...]] = {
    "multisample": (("multisample M=8", {"samples": 8}), ("multisample M=1", {"samples": 1})),
    "stochastic_depth": (("s.d. block", {"p": 0.5, "mode": "block", "distribution": "linear"}),
                         ("s.d. sample", {"p": 0.1, "mode": "sample", "distribution": "linear"})),
}


def registered_methods() -> tuple[tuple[str, str, dict], ...]:
    """The benchmark's method list, read from the registry when called."""
    return tuple(case for name in REGISTRY for case in
                 (tuple((label, name, o) for label, o in VARIANTS[name]) if name in VARIANTS else ((name, name, {}),)))


@dataclass(frozen=True)
class ModelCase:
    """A model to step: its config ``model`` section, input shape and batch size."""

    label: str  # the model's config name (conf/model/<label>.yaml)
    channels: int
    image_size: int
    batch: int
    options: dict = field(default_factory=dict)  # overrides of the model's config file

    def model_config(self) -> DictConfig:
        return config("model", self.label, **self.options)

    def build(self) -> nn.Module:
        info = DataInfo("synthetic", 10, self.channels, self.image_size, TOTAL_STEPS, 0)
        return build_model(self.model_config(), info)

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return (f"{self.label} ({options}), batch {self.batch}x{self.channels}x"
                f"{self.image_size}x{self.image_size}")


def make_batches(case: ModelCase, device: torch.device, count: int = 4, seed: int = 0
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.channels, case.image_size, case.image_size)
    return [(torch.randn(shape, generator=generator).to(device),
             torch.randint(0, 10, (case.batch,), generator=generator).to(device))
            for _ in range(count)]


def step_parts(model: nn.Module, net: Callable, runtime: Runtime) -> training.StepParts:
    """What `regdrop.train.train_step` needs, as the trainer builds it (``net``: the model,
    or it compiled); the methods are told the run's length."""
    optimizer, schedule = optimizer_and_schedule(model)
    setup_run(model, TOTAL_STEPS)
    return training.StepParts(
        model=model, net=net, optimizer=optimizer, lr_schedule=schedule,
        scaler=torch.amp.GradScaler(runtime.device.type,
                                    enabled=runtime.autocast_dtype is torch.float16),
        runtime=runtime,
    )


def framework_step(model: nn.Module, runtime: Runtime, batches: list) -> Callable[[], object]:
    """One optimizer step through `regdrop.train.train_step`, the trainer's own function."""
    parts = step_parts(model, model, runtime)
    stream = itertools.cycle(batches)
    counter = itertools.count()

    def run() -> object:
        # Looked up on the module at each call, so the step is always the trainer's own.
        return training.train_step(parts, stream, next(counter), 1.0)

    return run


def bare_step(model: nn.Module, runtime: Runtime, batches: list) -> Callable[[], object]:
    """One optimizer step as a hand-written PyTorch loop takes it, same optimizer and data."""
    optimizer, schedule = optimizer_and_schedule(model)
    stream: Iterator = itertools.cycle(batches)

    def run() -> object:
        x, y = next(stream)
        with runtime.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        return loss

    return run


def step_comparisons(cases: list[ModelCase], runtime: Runtime, *, repeats: int, warmup: int,
                     min_time_s: float, seed: int = 0,
                     methods: tuple[tuple[str, str, dict], ...] | None = None,
                     clock: Callable[[], float] = time.perf_counter
                     ) -> tuple[list[Comparison], list[str]]:
    """One `Comparison` per model: bare loop, ``none`` and every method that applies."""
    comparisons, notes = [], []
    methods = registered_methods() if methods is None else methods
    for case in cases:
        torch.manual_seed(seed)
        initial = case.build().to(runtime.device).train()
        batches = make_batches(case, runtime.device, seed=seed)
        candidates = [Candidate("bare loop", bare_step(copy.deepcopy(initial), runtime, batches)),
                      Candidate("none", framework_step(copy.deepcopy(initial), runtime, batches))]
        pairs = [("none", "bare loop")]
        for label, method, overrides in methods:
            model = copy.deepcopy(initial)
            try:
                apply_method(model, {"name": method, **overrides}, seed=seed)  # the method's defaults
            except ConfigError as err:
                notes.append(f"steps, {case.label}: {label} does not apply ({err})")
                continue
            model.to(runtime.device)
            candidates.append(Candidate(label, framework_step(model, runtime, batches)))
            pairs.append((label, "none"))
        if any(label == "multisample M=8" for label, _ in pairs) and any(
                label == "multisample M=1" for label, _ in pairs):
            pairs.append(("multisample M=8", "multisample M=1"))
        say(f"  steps: {case.describe()}, {len(candidates)} candidates")
        torch.manual_seed(seed)
        timings = measure(candidates, repeats=repeats, warmup=warmup, min_time_s=min_time_s,
                          sync=synchronizer(runtime.device), clock=clock)
        comparisons.append(Comparison(
            "steps", case.describe(),
            {c.name: t for c, t in zip(candidates, timings, strict=True)}, pairs))
    return comparisons, notes
