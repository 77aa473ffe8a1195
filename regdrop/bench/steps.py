"""Whole training steps: each method through the trainer's own `regdrop.train.train_step`,
against the same model with no method and against a bare hand-written PyTorch loop.

For each model every candidate starts from a copy of the same initial weights, gets its own
optimizer (regdrop's SGD with Nesterov momentum, no weight decay on norms and biases, as
the default config) and cosine LR schedule, and cycles through the same few batches held
on the device (no loader: the data cost is measured apart, in `regdrop.bench.data`). The
bare loop is what one would write by hand: forward, cross-entropy, backward, optimizer and
LR-schedule step, zero the gradients. ``none`` against ``bare loop`` is therefore the
framework's own cost per step (the method hooks, the loss and accuracy kept on the device,
the scaler and autocast wrappers).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from regdrop import train as training
from regdrop.bench.report import Comparison
from regdrop.bench.timing import Candidate, measure, synchronizer
from regdrop.data import DataInfo
from regdrop.errors import ConfigError
from regdrop.methods import apply_method, setup_run
from regdrop.models import build_model
from regdrop.optim import build_lr_schedule, build_optimizer
from regdrop.runtime import Runtime

# The default config's optimizer and LR schedule (conf/optim/sgd.yaml, conf/lr/cosine.yaml).
OPTIM = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
LR = {"name": "cosine", "warmup_epochs": 0, "warmup_start_factor": 0.0, "min_factor": 0.0}
# A run length for the LR schedule and gyro's periods, longer than any benchmark.
TOTAL_STEPS = 100_000

# (label, config ``dropout`` section). Rates as the papers use them: p=0.5 for FC dropout,
# gyro and multi-sample; 0.1 for spatial; block-wise stochastic depth at Huang et al.'s
# linear 0.5, sample-wise at Composer's card's 0.1.
METHODS: tuple[tuple[str, dict], ...] = (
    ("standard", {"name": "standard", "p": 0.5}),
    ("spatial", {"name": "spatial", "p": 0.1}),
    ("dropconnect", {"name": "dropconnect", "p": 0.5}),
    ("gyro", {"name": "gyro", "p": 0.5}),
    ("multisample M=8", {"name": "multisample", "p": 0.5, "samples": 8}),
    ("multisample M=1", {"name": "multisample", "p": 0.5, "samples": 1}),
    ("s.d. block", {"name": "stochastic_depth", "drop_rate": 0.5, "mode": "block",
                    "distribution": "linear"}),
    ("s.d. sample", {"name": "stochastic_depth", "drop_rate": 0.1, "mode": "sample",
                     "distribution": "linear"}),
)


@dataclass(frozen=True)
class ModelCase:
    """A model to step: its config ``model`` section, input shape and batch size."""

    label: str
    model: dict
    channels: int
    image_size: int
    batch: int

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.model.items() if k != "name")
        return (f"{self.label} ({options}), batch {self.batch}x{self.channels}x"
                f"{self.image_size}x{self.image_size}")


def make_batches(case: ModelCase, device: torch.device, count: int = 4, seed: int = 0
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.channels, case.image_size, case.image_size)
    return [(torch.randn(shape, generator=generator).to(device),
             torch.randint(0, 10, (case.batch,), generator=generator).to(device))
            for _ in range(count)]


def framework_step(model: nn.Module, runtime: Runtime, batches: list) -> Callable[[], object]:
    """One optimizer step through `regdrop.train.train_step`, the trainer's own function."""
    optimizer = build_optimizer(OmegaConf.create(OPTIM), model)
    parts = training.StepParts(
        model=model, net=model, optimizer=optimizer,
        lr_schedule=build_lr_schedule(OmegaConf.create(LR), optimizer, TOTAL_STEPS, TOTAL_STEPS),
        scaler=torch.amp.GradScaler(runtime.device.type,
                                    enabled=runtime.autocast_dtype is torch.float16),
        runtime=runtime,
    )
    setup_run(model, TOTAL_STEPS)
    stream = itertools.cycle(batches)
    counter = itertools.count()

    def run() -> object:
        # Looked up on the module at each call, so the step is always the trainer's own.
        return training.train_step(parts, stream, next(counter), 1.0)

    return run


def bare_step(model: nn.Module, runtime: Runtime, batches: list) -> Callable[[], object]:
    """One optimizer step as a hand-written PyTorch loop takes it, same optimizer and data."""
    optimizer = build_optimizer(OmegaConf.create(OPTIM), model)
    schedule = build_lr_schedule(OmegaConf.create(LR), optimizer, TOTAL_STEPS, TOTAL_STEPS)
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
                     methods: tuple[tuple[str, dict], ...] = METHODS
                     ) -> tuple[list[Comparison], list[str]]:
    """One `Comparison` per model: bare loop, ``none`` and every method that applies."""
    comparisons, notes = [], []
    for case in cases:
        info = DataInfo("synthetic", 10, case.channels, case.image_size, TOTAL_STEPS, 0)
        torch.manual_seed(seed)
        initial = build_model(OmegaConf.create(case.model), info).to(runtime.device).train()
        batches = make_batches(case, runtime.device, seed=seed)
        candidates = [Candidate("bare loop", bare_step(copy.deepcopy(initial), runtime, batches)),
                      Candidate("none", framework_step(copy.deepcopy(initial), runtime, batches))]
        pairs = [("none", "bare loop")]
        for label, method in methods:
            model = copy.deepcopy(initial)
            try:
                apply_method(model, OmegaConf.create(method), seed=seed)
            except ConfigError as err:
                notes.append(f"steps, {case.label}: {label} does not apply ({err})")
                continue
            model.to(runtime.device)
            candidates.append(Candidate(label, framework_step(model, runtime, batches)))
            pairs.append((label, "none"))
        if any(label == "multisample M=8" for label, _ in pairs) and any(
                label == "multisample M=1" for label, _ in pairs):
            pairs.append(("multisample M=8", "multisample M=1"))
        torch.manual_seed(seed)
        timings = measure(candidates, repeats=repeats, warmup=warmup, min_time_s=min_time_s,
                          sync=synchronizer(runtime.device))
        comparisons.append(Comparison(
            "steps", case.describe(),
            {c.name: t for c, t in zip(candidates, timings, strict=True)}, pairs))
    return comparisons, notes
