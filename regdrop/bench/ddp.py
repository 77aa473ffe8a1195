"""Data parallelism's cost per step: two gloo processes on the CPU, each stepping the same
per-process batch, DDP's step against the same step with no collective.

Two changes of the training loop are measured, before and after:

* **The stop flag.** The loop used to agree on a preemption flag at every step (a pickled
  ``broadcast_object_list``: a collective and a host sync per step); now the flag rides in
  the all-reduce of the log flush. ``before`` is a DDP step followed by that broadcast,
  ``after`` the DDP step alone.
* **Block-mode stochastic depth.** A skipped branch leaves parameters without a gradient,
  which DDP handles only with ``find_unused_parameters=True`` (a walk of the autograd graph
  after every forward). ``before`` is that DDP; ``after`` is `regdrop.runtime.GradientAllReduce`,
  one flat all-reduce of the gradients that exist, as the trainer runs it.

Each process runs one torch thread, so the two processes fill a 2-core machine. The
reference, ``one process``, is the same step with no wrapper and no collective, run by both
processes at once (same load on the machine). Every candidate runs the same few batches
from a copy of the same initial weights; the candidates are timed interleaved by
`regdrop.bench.timing.measure` (the same rotating order in both processes, so their
collectives meet); rank 0's samples are the result.
"""

from __future__ import annotations

import copy
import itertools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from regdrop.bench.report import Comparison
from regdrop.bench.steps import TOTAL_STEPS, ModelCase, config, make_batches, optimizer_and_schedule
from regdrop.bench.timing import Candidate, Timing, measure, summarise
from regdrop.methods import apply_method, setup_run
from regdrop.runtime import GradientAllReduce

WORLD_SIZE = 2
STEPS_PER_MEASUREMENT = 3  # fixed, not timed per process: both processes must run alike
ONE_PROCESS = "one process"
CASES = {
    # case: (stochastic depth options or None, {candidate: how the model is wrapped})
    "no method: DDP step, stop flag": (None, {"before: stop-flag broadcast every step": "ddp+flag",
                                              "after: DDP, flag at log flushes": "ddp"}),
    "block-wise stochastic depth (linear 0.5): data parallelism": (
        {"p": 0.5, "mode": "block", "distribution": "linear"},
        {"before: DDP find_unused_parameters": "ddp-unused", "after: flat gradient all-reduce": "flat"}),
}


def _step(model: nn.Module, wrapping: str, batches: list) -> Callable[[], object]:
    """``STEPS_PER_MEASUREMENT`` optimizer steps of ``model`` wrapped as ``wrapping`` says."""
    net: nn.Module = model
    if wrapping in ("ddp", "ddp+flag", "ddp-unused"):
        net = DistributedDataParallel(model, find_unused_parameters=wrapping == "ddp-unused")
    elif wrapping == "flat":
        net = GradientAllReduce(model, WORLD_SIZE)
    optimizer, schedule = optimizer_and_schedule(model)
    stream = itertools.cycle(batches)

    def run() -> object:
        for _ in range(STEPS_PER_MEASUREMENT):
            x, y = next(stream)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            if wrapping == "flat":
                net.all_reduce_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if wrapping == "ddp+flag":
                flag = [False]
                dist.broadcast_object_list(flag, src=0)
        return loss

    return run


def _worker(rank: int, folder: str, case: ModelCase, repeats: int, warmup: int, seed: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        batches = make_batches(case, torch.device("cpu"), seed=seed + rank)
        found = {}
        for label, (depth, wrappings) in CASES.items():
            torch.manual_seed(seed)
            model = case.build()
            if depth is not None:
                apply_method(model, config("dropout", "stochastic_depth", **depth), seed=seed)
            setup_run(model, TOTAL_STEPS)
            candidates = [Candidate(ONE_PROCESS, _step(copy.deepcopy(model), "none", batches))]
            candidates += [Candidate(name, _step(copy.deepcopy(model), how, batches)) for name, how in wrappings.items()]
            timings = measure(candidates, repeats=repeats, warmup=warmup, min_time_s=0.0)
            found[label] = {c.name: t.samples for c, t in zip(candidates, timings, strict=True)}
        if rank == 0:
            Path(folder, "samples.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def ddp_comparisons(case: ModelCase, *, repeats: int, warmup: int, seed: int = 0
                    ) -> tuple[list[Comparison], list[str]]:
    """Each `CASES` entry timed in two gloo processes (wall clock: the wait for a collective
    is the cost): ``before`` and ``after`` against ``one process``, and ``before`` against
    ``after`` (seconds per optimizer step)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(folder, case, repeats, warmup, seed), nprocs=WORLD_SIZE, join=True)
        found = json.loads(Path(folder, "samples.json").read_text())
    comparisons = []
    for label, (_, wrappings) in CASES.items():
        timings = {name: _per_step(samples) for name, samples in found[label].items()}
        comparisons.append(Comparison("ddp", f"{label}; {case.describe()} per process, 2 gloo processes",
                                      timings, [*((name, ONE_PROCESS) for name in wrappings), tuple(reversed(list(wrappings)))]))
    notes = [f"ddp: 2 gloo processes of one torch thread each on this machine, {case.describe()} per process"]
    return comparisons, notes


def _per_step(samples: list[float]) -> Timing:
    return summarise([s / STEPS_PER_MEASUREMENT for s in samples], STEPS_PER_MEASUREMENT)
