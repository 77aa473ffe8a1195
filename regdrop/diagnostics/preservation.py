"""Measuring leaves no trace: `preserved_state` runs a block and puts back the model's
buffers, extra state and training flags and the global random generators.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from regdrop.methods.base import DropModule
from regdrop.rng import seeded_global_state


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
