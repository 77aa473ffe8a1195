"""The early-linear drop-rate schedule under ``torch.compile``: how many steps until nothing
recompiles, and the compiled step time against the eager one.

The default run's model (LeNet width 0.125 with standard dropout p=0.5) trains through
`regdrop.train.train_step` with ``net = torch.compile(model)`` while the early-linear
schedule (Liu et al. 2023) moves the rate from the peak down to exactly 0 at the cutoff and
keeps it there. The rate lives in a tensor buffer, so the graphs compiled at the first step
must serve every later one; dynamo's graph counter is read after each step. Then compiled
and eager steps are timed side by side at half the peak rate, with the same model without
dropout compiled and eager beside them (what the compiler does to the model alone).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable

import torch
import torch._dynamo

from regdrop import train as training
from regdrop.bench.report import Comparison
from regdrop.bench.steps import ModelCase, config, make_batches, step_parts
from regdrop.bench.timing import Candidate, measure, synchronizer
from regdrop.methods import apply_method
from regdrop.runtime import Runtime
from regdrop.schedules import DropSchedule

# The default run's model and batch.
CASE = ModelCase("lenet", 1, 28, 128, {"width": 0.125})


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_case(runtime: Runtime, *, backend: str, steps: int, cutoff: int, repeats: int,
                 warmup: int, min_time_s: float, seed: int = 0, case: ModelCase = CASE,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[dict, Comparison]:
    """Facts of the recompilation check and the compiled-vs-eager comparison."""
    torch.manual_seed(seed)
    plain = case.build().to(runtime.device).train()
    model = copy.deepcopy(plain)
    apply_method(model, config("dropout", "standard"), seed=seed)
    eager_model = copy.deepcopy(model)
    batches = make_batches(case, runtime.device, seed=seed)
    torch._dynamo.reset()
    compiled = step_parts(model, torch.compile(model, backend=backend), runtime)
    eager = step_parts(eager_model, eager_model, runtime)
    schedule = DropSchedule(name="early", shape="linear", steps=cutoff)
    sync = synchronizer(runtime.device)

    stream = itertools.cycle(batches)
    start_graphs = _graphs()
    per_step, first_step_s = [], 0.0
    for step in range(steps):
        sync()
        start = time.perf_counter()
        training.train_step(compiled, stream, step, schedule.factor(step))
        sync()
        if step == 0:
            first_step_s = time.perf_counter() - start
        per_step.append(_graphs() - start_graphs)
    compiling = [step for step in range(steps)
                 if per_step[step] > (per_step[step - 1] if step else 0)]
    facts = {
        "setting": (f"{case.describe()}, standard dropout p=0.5, early-linear schedule to 0 at "
                    f"step {cutoff}, {steps} steps, backend {backend}"),
        "backend": backend, "steps": steps, "cutoff": cutoff,
        "graphs": per_step[-1], "graphs_per_step": per_step,
        "graphs_after_warmup": per_step[-1] - per_step[0],
        "last_compile_step": compiling[-1] if compiling else -1,
        "first_step_s": first_step_s,
        "factors": [schedule.factor(step) for step in range(steps)],
    }

    def timed(parts: training.StepParts):
        counter = itertools.count(steps)
        data = itertools.cycle(batches)
        return lambda: training.train_step(parts, data, next(counter), 0.5)

    # The same model without dropout, compiled and eager: what the compiler does to the
    # model alone, apart from what it does to the dropout.
    plain_eager = copy.deepcopy(plain)
    candidates = [
        Candidate("compiled", timed(compiled)), Candidate("eager", timed(eager)),
        Candidate("compiled, no dropout",
                  timed(step_parts(plain, torch.compile(plain, backend=backend), runtime))),
        Candidate("eager, no dropout", timed(step_parts(plain_eager, plain_eager, runtime))),
    ]
    timings = measure(candidates, repeats=repeats, warmup=warmup, min_time_s=min_time_s,
                      sync=sync, clock=clock)
    comparison = Comparison(
        "compile", f"{case.label} + standard dropout, train_step at half the peak rate, "
        f"backend {backend}",
        {c.name: t for c, t in zip(candidates, timings, strict=True)},
        [("compiled", "eager"), ("compiled, no dropout", "eager, no dropout"),
         ("compiled", "compiled, no dropout"), ("eager", "eager, no dropout")])
    return facts, comparison
