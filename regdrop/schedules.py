"""Drop-rate schedules: the fraction of a method's peak rate in force at each optimizer step.

Definitions follow Liu et al., "Dropout Reduces Underfitting" (ICML 2023) and its official
code. Steps are optimizer steps (a gradient-accumulation cycle counts once). A cutoff or
warm-up given in epochs becomes ``N = epochs * steps_per_epoch`` steps, rounded half up
(`epochs_to_steps`, the rule the learning-rate schedules use too), so a fractional epoch is
fine. With step ``s`` counted from 0:

* ``constant``: 1 at every step.
* ``early``, ``shape=constant``: 1 for ``s < N``, then 0.
* ``early``, ``shape=linear``: ``linspace(1, 0, N)`` over steps ``0 .. N-1`` (1 at step 0,
  exactly 0 at step ``N-1``, both ends included, as the official code's ``np.linspace``),
  then 0.
* ``late``: 0 for ``s < N``, then 1.
* ``warmup``: ``linspace(0, 1, N)`` over steps ``0 .. N-1`` (reaching exactly 1 at step
  ``N-1``, unlike Composer's warm-up, which stops one step short), then 1.

The schedule is a pure function of the step, so a resumed run continues the same sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from regdrop.errors import ConfigError, check_keys, check_number

SCHEDULES = ("constant", "early", "late", "warmup")
SHAPES = ("constant", "linear")
_KEYS = {
    "constant": set(),
    "early": {"shape", "cutoff_epoch"},
    "late": {"cutoff_epoch"},
    "warmup": {"warmup_epochs"},
}


def steps_per_epoch(num_train: int, batch_size: int, grad_accum: int = 1, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: ``num_train // (batch x accumulation x world size)``."""
    return num_train // (batch_size * grad_accum * world_size)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """``epochs`` (may be fractional) in optimizer steps, rounded half up: the one rule for
    every duration given in epochs (drop-rate cutoffs and warm-ups, LR warm-ups and
    milestones). Python's round() would send 7.5 steps to 8 but 2.5 to 2."""
    return math.floor(epochs * steps_per_epoch + 0.5)


def check_schedule(cfg) -> None:
    """Check the config ``schedule`` section: name, keys and values."""
    options = dict(cfg)
    name = options.pop("name", "constant")
    if name not in SCHEDULES:
        raise ConfigError("schedule.name", f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    check_keys(options, "schedule", _KEYS[name])
    shape = options.get("shape", "constant")
    if shape not in SHAPES:
        raise ConfigError("schedule.shape", f"must be one of {', '.join(SHAPES)}, got {shape!r}")
    for key in ("cutoff_epoch", "warmup_epochs"):
        if key in options:
            check_number(options[key], f"schedule.{key}", minimum=0)


@dataclass(frozen=True)
class DropSchedule:
    """A drop-rate schedule, as a factor in [0, 1] of the peak rate at each optimizer step."""

    name: str = "constant"
    shape: str = "constant"
    steps: int = 0  # the cutoff (early, late) or the warm-up length (warmup), in steps

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError("schedule.name", f"unknown schedule {self.name!r}; valid: {', '.join(SCHEDULES)}")
        if self.shape not in SHAPES or (self.shape == "linear" and self.name != "early"):
            raise ConfigError("schedule.shape", f"must be one of {SHAPES} (linear only for early), got {self.shape!r}")
        if self.steps < 0:
            raise ConfigError("schedule", f"the cutoff / warm-up must not be negative, got {self.steps} steps")

    @classmethod
    def from_config(cls, cfg, steps_per_epoch: int) -> DropSchedule:
        """Build from the config ``schedule`` section; epochs become steps here."""
        check_schedule(cfg)
        options = dict(cfg)
        name = options.pop("name", "constant")
        epochs = options.get("cutoff_epoch", options.get("warmup_epochs", 0))
        steps = epochs_to_steps(epochs, steps_per_epoch)
        return cls(name=name, shape=options.get("shape", "constant"), steps=steps)

    def factor(self, step: int) -> float:
        """The fraction of the peak rate in force at optimizer step ``step`` (from 0)."""
        n = self.steps
        if self.name == "constant":
            return 1.0
        if self.name == "late":
            return 0.0 if step < n else 1.0
        if self.name == "warmup":
            if step >= n:
                return 1.0
            return 0.0 if n == 1 else step / (n - 1)
        # early
        if step >= n:
            return 0.0
        if self.shape == "constant" or n == 1:
            return 1.0
        return 1.0 - step / (n - 1)

    def factors(self, total_steps: int) -> list[float]:
        return [self.factor(step) for step in range(total_steps)]

    def describe(self) -> str:
        if self.name == "constant":
            return "constant"
        what = {"early": f"early ({self.shape}), cutoff", "late": "late, cutoff", "warmup": "warm-up over"}
        return f"{what[self.name]} {self.steps} steps"
