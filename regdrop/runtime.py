"""The process a run lives in: device, precision, seeds and CPU threads.

`check_trainer` checks the config ``trainer`` section (how the run executes) without
building anything; `setup_runtime` applies it and returns a `Runtime`, which the training
loop asks for the device and the autocast context.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from regdrop.errors import ConfigError, check_keys, check_number

TRAINER_KEYS = {
    "epochs", "grad_accum", "device", "precision", "compile", "compile_backend", "deterministic",
    "threads", "eval_every", "eval_batches", "max_steps", "grad_clip", "progress", "log_every",
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# numpy's legacy seeding, which `seed_everything` feeds, takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Runtime:
    """Where and how the run computes."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def check_seed(seed) -> None:
    check_number(seed, "seed", integer=True, minimum=0)
    if seed > MAX_SEED:
        raise ConfigError("seed", f"must be an integer in 0..{MAX_SEED}, got {seed!r}")


def check_trainer(trainer) -> None:
    """Check the config ``trainer`` section: keys, numbers, flags, device, precision, backend."""
    check_keys(trainer, "trainer", TRAINER_KEYS)
    for key in ("epochs", "grad_accum", "eval_every", "log_every"):
        check_number(trainer[key], f"trainer.{key}", integer=True, minimum=1)
    for key in ("max_steps", "eval_batches", "threads"):
        check_number(trainer[key], f"trainer.{key}", integer=True, minimum=1, optional=True)
    check_number(trainer.grad_clip, "trainer.grad_clip", above=0, optional=True)
    for key in ("compile", "deterministic", "progress"):
        if not isinstance(trainer[key], bool):
            raise ConfigError(f"trainer.{key}", f"must be true or false, got {trainer[key]!r}")
    pick_precision(trainer.precision, pick_device(trainer.device))
    if trainer.compile:  # torch._dynamo takes seconds to import: only when it will run
        check_compile_backend(trainer.compile_backend)


def check_compile_backend(name) -> None:
    """``trainer.compile_backend`` must be a backend torch.compile knows."""
    from torch._dynamo import list_backends

    valid = sorted({*list_backends(exclude_tags=()), "inductor"})
    if name not in valid:
        raise ConfigError("trainer.compile_backend", f"unknown torch.compile backend {name!r}; valid: {', '.join(valid)}")


def setup_runtime(trainer, seed: int) -> Runtime:
    """Seed every global generator, set threads and determinism; pick device and precision."""
    seed_everything(seed, trainer.deterministic)
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    device = pick_device(trainer.device)
    return Runtime(device, pick_precision(trainer.precision, device))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, ask torch for determinism too."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("trainer.device", f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("trainer.device", f"unsupported device {name!r}; valid: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda was asked for but no CUDA device is available; use auto or cpu")
    return device


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32): bf16 on CUDA and fp32 on CPU for ``auto``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in PRECISIONS:
        raise ConfigError("trainer.precision", f"unknown precision {name!r}; valid: auto, fp32, bf16, fp16")
    return PRECISIONS[name]
