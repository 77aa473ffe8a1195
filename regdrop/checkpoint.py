"""The state of a training run that is not a module's (`TrainState`), and checkpoints.

Everything the loop counts (step, epoch, the best test accuracy, timings, the running sums
of the current epoch) lives in one object with a ``state_dict``. A checkpoint holds it
whole, with the model (every method's state included: gyro's bank, selection and step,
block-mode gate generators), the optimizer, the LR schedule, the grad scaler, every
random generator, the data position, the length of ``metrics.jsonl`` it covers and the
wandb run id, so a resumed run continues exactly where it stopped.

Checkpoints are written atomically: to a temporary file, flushed and fsync'ed, then
renamed over the old one (and the folder fsync'ed), so a run killed at any moment leaves
either the old checkpoint or the new one, never a torn file. The one before the last is
kept as ``checkpoint.prev.pt`` (rotated by a hard link, so some checkpoint is always in
place): a latest one damaged on the disk costs one checkpoint interval, not the run
(``trainer.resume=<run folder>/checkpoint.prev.pt``). A file that cannot be read back as a
regdrop checkpoint is a `RunFileError` naming it, never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from regdrop.errors import RunFileError, read_error
from regdrop.preemption import critical_section
from regdrop.runfolder import BEST as BEST  # the checkpoint files of a run folder, named here too
from regdrop.runfolder import CHECKPOINT as CHECKPOINT
from regdrop.runfolder import PREVIOUS as PREVIOUS
from regdrop.tracking import StepValues, write_atomically

REQUIRED = ("config_hash", "model", "optimizer", "state", "rng")  # what makes a regdrop checkpoint


@dataclass
class TrainState:
    """The loop's counters: optimizer steps done, the epoch, the best evaluation, timings."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (from 1), or the last one finished
    epoch_steps: int = 0  # optimizer steps done in that epoch
    epoch_finished: bool = True  # its steps and its evaluation are done
    best_acc: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)
    train_time: float = 0.0  # seconds spent in training steps
    train_samples: int = 0
    epoch_loss_sum: float = 0.0  # sum over the epoch's samples (loss x batch)
    epoch_correct: int = 0
    epoch_samples: int = 0
    epoch_loss: float = float("nan")  # the mean of the last finished epoch
    epoch_means: dict[str, float] = field(default_factory=dict)  # of the last finished epoch

    def next_epoch(self) -> int:
        """The epoch to run now: the unfinished one (a resumed run), else the next."""
        return self.epoch if not self.epoch_finished else self.epoch + 1

    def begin_epoch(self, epoch: int) -> None:
        """Start ``epoch``, unless it is the unfinished one a resumed run continues."""
        if epoch == self.epoch and not self.epoch_finished:
            return
        self.epoch, self.epoch_steps, self.epoch_finished = epoch, 0, False
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
        self.epoch_means = {"train/epoch_loss": self.epoch_loss, "train/epoch_acc": self.epoch_correct / samples}
        return self.epoch_means

    def record_eval(self, metrics: dict[str, float]) -> bool:
        """Keep an evaluation; True when it is the best so far."""
        self.last_eval = dict(metrics)
        better = metrics["test/acc"] > self.best_acc
        self.best_acc = max(self.best_acc, metrics["test/acc"])
        return better

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_payload(stateful: dict[str, Any], state: TrainState, rng: list[Any],
                       facts: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint holds: the ``state_dict`` of each of ``stateful`` under its key
    (``model``, ``optimizer``, ``lr_schedule``, ``scaler``), the loop's counters under
    ``state``, every rank's global random state by rank under ``rng``, and the run's
    ``facts``: ``config_hash``, ``metrics_bytes`` (the length of metrics.jsonl it covers),
    ``wandb_run_id``, ``diagnostics_initial`` and ``world_size``."""
    return {**{key: value.state_dict() for key, value in stateful.items()},
            "state": state.state_dict(), "rng": rng, **facts}


def restore_checkpoint(saved: dict[str, Any], stateful: dict[str, Any], state: TrainState, rank: int) -> Any:
    """Load a `checkpoint_payload` back into ``stateful`` and ``state``; return the global
    random state saved by ``rank`` (rank 0's when the run had fewer processes)."""
    for key, value in stateful.items():
        value.load_state_dict(saved[key])
    state.load_state_dict(saved["state"])
    return saved["rng"][rank if rank < len(saved["rng"]) else 0]


def save_atomically(payload: dict[str, Any], path: Path, keep_previous: bool = False) -> Path:
    """``torch.save`` to ``path`` through a temporary file: write, flush, fsync, rename.

    ``keep_previous``: the checkpoint in place first becomes ``checkpoint.prev.pt`` (a hard
    link renamed into place, so ``path`` exists at every moment). A second Ctrl-C waits
    for the write (`critical_section`); a failed write leaves no temporary file behind.
    """
    path = Path(path)
    with critical_section():
        if keep_previous and path.exists():
            _link_atomically(path, path.with_name(PREVIOUS))
        write_atomically(path, lambda f: torch.save(payload, f))
    return path


def _link_atomically(source: Path, target: Path) -> None:
    """``target`` becomes another name of ``source`` (a copy where hard links are refused)."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # a file system without hard links: copy instead
        import shutil

        try:
            shutil.copyfile(source, temporary)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    os.replace(temporary, target)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_atomically` (on the CPU; the caller moves state).

    A file that is truncated, garbage or not a regdrop checkpoint is a `RunFileError` that
    names it and the ways forward (the previous checkpoint beside it when there is one)."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError,
            UnicodeDecodeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise damaged_checkpoint(path, f"cannot be read as a checkpoint ({read_error(err)}): "
                                       "truncated or overwritten") from None
    missing = [key for key in REQUIRED if key not in saved] if isinstance(saved, dict) else list(REQUIRED)
    if missing:
        raise damaged_checkpoint(path, f"is not a regdrop checkpoint (it lacks {', '.join(missing)})")
    return saved


def damaged_checkpoint(path: Path, problem: str) -> RunFileError:
    """The error for a checkpoint that cannot be used, with every way forward."""
    ways = []
    previous = path.with_name(PREVIOUS)
    if path.name != PREVIOUS and previous.is_file():
        ways.append(f"resume from the previous checkpoint (one interval earlier) with "
                    f"trainer.resume={previous}")
    ways += ["start the run afresh with trainer.rerun=true (its files move to previous-<time>/)",
             f"or delete {path} and run the same command again"]
    return RunFileError(path, problem, ways)
