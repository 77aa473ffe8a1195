"""Randomness in one place: named seed streams, and the save, restore and seeding of the
global generators.

**Streams.** Every random draw of a run that is not the global generators' comes from a
`torch.Generator` seeded by ``stream_seed(seed, name, *indices)``: the run's seed, the
stream's NAME (``"data.order"``, ``"gyro.site"``, ...) and the integers that tell its
instances apart (epoch, batch, rank, the index of a layer). `STREAMS` is the table of
the core's names (data, loss, runtime, diagnostics), with what each seeds; each method
module lists its own in a module-level ``RNG_STREAMS`` tuple, named ``<method>.<what>``
(``regdrop/methods/gyro.py``: ``gyro.site``, ``gyro.bank``, ``gyro.selection``).

A name is turned into a 64-bit key by hashing it (BLAKE2b, the same on every process and
platform, unlike Python's ``hash``), not by looking it up in a table. So a new method
names its streams without editing this module (which, being below every other module,
must not import the methods), and the uniqueness test (``tests/test_rng.py``) checks
`STREAMS` together with every registered method's ``RNG_STREAMS``. Small
integers picked module by module (the previous scheme) let two streams share a seed
without anyone noticing; distinct names give distinct keys, and the test proves that no
two seeds a run derives coincide.

**Global generators.** Python's, NumPy's and torch's (CPU and CUDA) global generators are
drawn from by library code that takes no generator (timm's RandAugment, random erasing,
mixup; dropout layers). `capture_global_state` and `restore_global_state` save and put
back all of them (a checkpoint stores the former's dict); `seeded_global_state` runs a
block under a seeded global state and restores the previous one after, so such a library
op becomes a pure function of its seed and leaves the run's other draws alone;
`seed_global` seeds them all at the start of a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

_MASK64 = (1 << 64) - 1

# name -> what it seeds (the indices after the name, in order).
STREAMS: dict[str, str] = {
    "data.order": "the in-memory loader's sample order of an epoch (epoch); the image-folder sampler's base seed",
    "data.crop": "random crop and flip of a training batch (epoch, batch, rank)",
    "data.randaugment": "RandAugment of a training batch, through the global generators (epoch, batch, rank)",
    "data.erasing": "random erasing of a training batch, through the global generators (epoch, batch, rank)",
    "data.synthetic": "the synthetic data set's prototypes and samples",
    "data.subset": "the random subset of an image-folder training set, and its loader's worker seeds",
    "loss.mix": "mixup / cutmix of a micro-batch, through the global generators (step, micro-batch, rank)",
    "runtime.rank": "a data-parallel rank's global torch generator after the model is built (rank)",
    "diagnostics.batches": "the training batches a gradient diagnostic reads (step)",
    "diagnostics.reference": "the fixed reference subset of the state-preservation diagnostic",
    "diagnostics.dropout": "the dropout masks of diagnostic passes (step, or none for evaluation)",
}

_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and the integer ``keys`` (splitmix64).

    Distinct ``(seed, keys)`` give unrelated seeds, so layer ``k`` of one run seed is not
    layer ``k + 1`` of the next. Every data-parallel rank derives the same seeds. Code
    names its stream with `stream_seed`; this is the mixing step under it.
    """
    state = operator.index(seed) & _MASK64
    for key in (*keys, 0):
        state = (state + 0x9E3779B97F4A7C15 + (operator.index(key) & _MASK64)) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def stream_key(name: str) -> int:
    """The 64-bit key of a stream name: its BLAKE2b hash, stable across processes and platforms."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a stream name is dotted lower-case words such as 'gyro.site', got {name!r}")
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def stream_seed(seed: int, name: str, *indices: int) -> int:
    """The seed of instance ``indices`` of stream ``name`` in the run seeded ``seed``."""
    return derive_seed(seed, stream_key(name), *indices)


def stream_generator(seed: int, name: str, *indices: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with ``stream_seed(seed, name, *indices)``."""
    return torch.Generator().manual_seed(stream_seed(seed, name, *indices))


# -- the global generators ----------------------------------------------------------------


def capture_global_state(cuda_devices: Sequence[int] | None = None) -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators.

    ``cuda_devices``: the CUDA devices whose generators are included; None: every device
    (when CUDA is available). The dict is what `restore_global_state` takes and what a
    checkpoint stores.
    """
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if cuda_devices is None:
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
    elif cuda_devices:
        state["cuda"] = [torch.cuda.get_rng_state(index) for index in cuda_devices]
        state["cuda_devices"] = list(cuda_devices)
    return state


def restore_global_state(state: dict[str, Any]) -> None:
    """Put back the global generators' states saved by `capture_global_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A state without "cuda_devices" holds every device, in order (a checkpoint's).
        devices = state.get("cuda_devices", range(len(state["cuda"])))
        for index, cuda_state in zip(devices, state["cuda"], strict=True):
            torch.cuda.set_rng_state(cuda_state, index)


def seed_global(seed: int, cuda_devices: Sequence[int] | None = None) -> None:
    """Seed Python's, NumPy's and torch's CPU generator with ``seed``, and the CUDA
    devices' (``cuda_devices``; None: all of them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds
    torch.default_generator.manual_seed(seed)
    if cuda_devices is None:
        torch.cuda.manual_seed_all(seed)  # deferred until CUDA is used; free without it
    else:
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)


@contextlib.contextmanager
def seeded_global_state(seed: int | None = None, cuda_devices: Sequence[int] = ()) -> Iterator[None]:
    """Run the block with the global generators seeded with ``seed`` (None: left as they
    are), then put back the states they had before it.

    Python's, NumPy's and torch's CPU generator are always saved and restored; CUDA
    generators only for ``cuda_devices`` (a data loader's block runs on the CPU and need
    not touch them).
    """
    saved = capture_global_state(cuda_devices)
    if seed is not None:
        seed_global(seed, cuda_devices)
    try:
        yield
    finally:
        restore_global_state(saved)
