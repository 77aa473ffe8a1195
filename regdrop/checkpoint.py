"""The state of a training run that is not a module's: `TrainState`.

Everything the loop counts (step, epoch, the best test accuracy, timings, the running sums
of the current epoch) lives in one object with a ``state_dict``, so a checkpoint holds it
whole and a resumed run continues every count where it stopped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from regdrop.tracking import StepValues


@dataclass
class TrainState:
    """The loop's counters: optimizer steps done, the epoch, the best evaluation, timings."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (from 1), or the last one finished
    best_acc: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)
    train_time: float = 0.0  # seconds spent in training steps
    train_samples: int = 0
    epoch_loss_sum: float = 0.0  # sum over the epoch's samples (loss x batch)
    epoch_correct: int = 0
    epoch_samples: int = 0
    epoch_loss: float = float("nan")  # the mean of the last finished epoch

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_loss_sum, self.epoch_correct, self.epoch_samples = 0.0, 0, 0

    def add(self, values: StepValues) -> None:
        """Count the steps one read of the step log returned."""
        for loss, correct, samples in zip(values.losses, values.correct, values.samples, strict=True):
            self.epoch_loss_sum += loss * samples
            self.epoch_correct += correct
            self.epoch_samples += samples
        self.train_samples += sum(values.samples)
        self.train_time += values.seconds

    def end_epoch(self) -> dict[str, float]:
        """The finished epoch's mean training loss and accuracy."""
        samples = max(self.epoch_samples, 1)
        self.epoch_loss = self.epoch_loss_sum / samples
        return {"train/epoch_loss": self.epoch_loss, "train/epoch_acc": self.epoch_correct / samples}

    def record_eval(self, metrics: dict[str, float]) -> None:
        self.last_eval = dict(metrics)
        self.best_acc = max(self.best_acc, metrics["test/acc"])

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
