"""The process a run lives in: device, precision, seeds, CPU threads, and its place among
data-parallel processes.

`check_trainer` checks the config ``trainer`` section (how the run executes) without
building anything; `setup_runtime` applies it and returns a `Runtime`, which the training
loop asks for the device, the autocast context, and the rank.

Data parallelism comes from torchrun's environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``): nccl on GPUs (one per local rank), gloo on the
CPU. Under SLURM through submitit with several tasks and no torchrun, submitit's
``TorchDistributedEnvironment`` exports the same variables. Every rank seeds the model's
initialisation alike; the global generators that draw dropout masks then get a per-rank
seed, so standard dropout and sample-wise masks differ across ranks while the methods'
own generators (gyro's bank and selection, block-mode gates) agree everywhere.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from regdrop.errors import ConfigError, check_keys, check_number
from regdrop.rng import seed_global, stream_seed

TRAINER_KEYS = {
    "epochs", "grad_accum", "device", "precision", "compile", "compile_backend", "deterministic",
    "threads", "eval_every", "eval_batches", "max_steps", "grad_clip", "progress", "log_every",
    "checkpoint_every", "keep_best", "resume", "rerun",
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# numpy's legacy seeding, which `seed_everything` feeds, takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Runtime:
    """Where and how the run computes, and which of ``world_size`` processes this is."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def seed_per_rank(self, seed: int) -> None:
        """After the model is built (alike on every rank): per-rank global generators."""
        if self.distributed:
            torch.manual_seed(stream_seed(seed, "runtime.rank", self.rank))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (a no-op on one process)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, value) -> list:
        """Every rank's ``value``, by rank (a one-item list on one process)."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


class GradientAllReduce(nn.Module):
    """Data parallelism for a model whose steps skip whole branches (block-mode stochastic
    depth), without DDP's ``find_unused_parameters``.

    DDP's reducer expects a gradient for every parameter; told that some may have none, it
    walks the autograd graph after every forward to find them (measured in
    docs/benchmarks.md). Here every rank skips the same branches (the gates draw alike), so
    the parameters that have a gradient are the same set on every rank: after the step's
    last backward, `all_reduce_gradients` averages exactly those in one flat all-reduce,
    and a skipped branch keeps ``grad=None``, as on one process (the optimizer leaves it
    alone: no momentum or weight decay step). Like DDP, the constructor copies rank 0's
    parameters and buffers to every rank and each forward rank 0's buffers (batch-norm
    statistics).
    """

    def __init__(self, module: nn.Module, world_size: int) -> None:
        super().__init__()
        self.module, self.world_size = module, world_size
        _broadcast_from_first_rank([*module.parameters(), *module.buffers()])

    def forward(self, *args, **kwargs):
        _broadcast_from_first_rank(list(self.module.buffers()))
        return self.module(*args, **kwargs)

    def all_reduce_gradients(self) -> None:
        """Average the gradients that exist over the ranks (one all-reduce per dtype)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for parameter in self.module.parameters():
            if parameter.grad is not None:
                by_dtype.setdefault(parameter.grad.dtype, []).append(parameter.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(reduced)


@torch.compiler.disable
def _broadcast_from_first_rank(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank (one broadcast per dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = _flatten_dense_tensors(group)
            torch.distributed.broadcast(flat, src=0)
            for tensor, value in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
                tensor.copy_(value)


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
    check_number(trainer.checkpoint_every, "trainer.checkpoint_every", integer=True, minimum=1, optional=True)
    resume = trainer.resume
    if not isinstance(resume, str) or not resume:
        raise ConfigError("trainer.resume", f"must be auto, never or the path of a checkpoint / run folder, got {resume!r}")
    for key in ("compile", "deterministic", "progress", "keep_best", "rerun"):
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
    """Seed every global generator, set threads and determinism; pick device and precision;
    join the process group when launched by torchrun (or submitit with several tasks)."""
    seed_everything(seed, trainer.deterministic)
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    rank, local_rank, world_size = _distributed_environment()
    device = pick_device(trainer.device)
    if world_size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, pick_precision(trainer.precision, device), rank, world_size)


def _distributed_environment() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's variables, or from SLURM through
    submitit when a job has several tasks and no torchrun."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
            and "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = world_size_from_env()
    if world_size <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size


def world_size_from_env() -> int:
    """The number of data-parallel processes torchrun started (1 without torchrun: a stray
    ``WORLD_SIZE`` with no ``RANK`` is not a launch)."""
    if "RANK" not in os.environ:
        return 1
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, ask torch for determinism too."""
    seed_global(seed)
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
