"""Side-by-side timing: candidates of one comparison measured interleaved, medians reported.

A `Candidate` is a named callable that performs one unit of work (a layer's forward and
backward, one optimizer step). `measure` warms every candidate up, picks for each how many
units one measurement runs (enough to last ``min_time_s``), and then takes ``repeats``
measurements of each, round-robin in a rotating order: a change of machine load (another
process starting on a shared CPU) hits every candidate alike instead of the one that
happened to run then. The device is synchronised before a measurement starts and before
it ends, so an accelerator's queued work is counted where it was issued.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Candidate:
    """One thing to time: ``run()`` performs one unit of work."""

    name: str
    run: Callable[[], object]


@dataclass
class Timing:
    """Seconds per unit of work over the repeats: median, interquartile range, all samples."""

    median_s: float
    iqr_s: float
    samples: list[float]
    number: int  # units of work per measurement

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median: how far to trust a ratio."""
        return self.iqr_s / self.median_s if self.median_s > 0 else math.inf

    def as_dict(self) -> dict:
        return {"median_ms": self.median_s * 1e3, "iqr_ms": self.iqr_s * 1e3,
                "spread": self.spread, "number": self.number,
                "samples_ms": [s * 1e3 for s in self.samples]}


def say(message: str) -> None:
    """A progress line on stderr (the results go to stdout and the output folder)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def summarise(samples: Sequence[float], number: int) -> Timing:
    values = list(samples)
    if len(values) >= 2:
        quartiles = statistics.quantiles(values, n=4, method="inclusive")
        iqr = quartiles[2] - quartiles[0]
    else:
        iqr = 0.0
    return Timing(statistics.median(values), iqr, values, number)


# The clocks a measurement can read: elapsed time, or the CPU time of this process (its
# threads' time on a core, whatever else the machine runs; with one torch thread on a
# shared CPU it is the steadier measure of the work done).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(
    candidates: Sequence[Candidate],
    *,
    repeats: int,
    warmup: int,
    min_time_s: float,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timing]:
    """Time each candidate ``repeats`` times, interleaved; one `Timing` per candidate.

    ``warmup`` units of each run first (allocator, caches, lazy set-up, compilation). One
    measurement runs ``number`` units, chosen per candidate from a timed unit so that it
    lasts about ``min_time_s`` (at least one unit). ``clock`` reads the time (`CLOCKS`).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    numbers = []
    for candidate in candidates:
        for _ in range(warmup):
            candidate.run()
        sync()
        start = clock()
        candidate.run()
        sync()
        once = clock() - start
        numbers.append(max(1, math.ceil(min_time_s / max(once, 1e-9))))
    samples: list[list[float]] = [[] for _ in candidates]
    count = len(candidates)
    for repeat in range(repeats):
        for offset in range(count):
            index = (repeat + offset) % count
            run, number = candidates[index].run, numbers[index]
            sync()
            start = clock()
            for _ in range(number):
                run()
            sync()
            samples[index].append((clock() - start) / number)
    return [summarise(values, number) for values, number in zip(samples, numbers, strict=True)]
