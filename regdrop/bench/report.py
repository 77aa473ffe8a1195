"""The benchmark's results: comparisons of timed candidates, measured facts, the targets of
the performance issue, and how they are printed (a plain table), saved (JSON) and written
up (Markdown).

Every ratio is the candidate's median time divided by its reference's: below 1 the
candidate is faster. A comparison's ``spread`` is the larger of the two relative
interquartile ranges, to say how far a ratio can be trusted.

A target's verdict carries the measurement's noise: the candidate and its reference are
measured in the same rounds (`regdrop.bench.timing.measure`), so each round gives one
paired ratio; the target's value is the median of those ratios and its interval a 95%
bootstrap confidence interval of that median (scipy.stats.bootstrap, seeded). The target is
met when the whole interval is on the right side of the limit, missed when the whole
interval is on the wrong side, and unresolved when the interval holds the limit: the
machine's noise was larger than the distance to the limit, and more repeats (or a quieter
machine) are needed to decide.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from regdrop.bench.timing import Timing

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # a fixed seed: the same samples always give the same interval


def paired_ratios(candidate: Timing, reference: Timing) -> list[float]:
    """Candidate time / reference time of each round (both were measured in it)."""
    return [c / r for c, r in zip(candidate.samples, reference.samples, strict=True) if r > 0]


def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95% percentile-bootstrap confidence interval of the median of ``values``."""
    if len(set(values)) < 2:  # nothing to resample: no spread was seen
        return (values[0], values[0]) if values else (math.nan, math.nan)
    result = stats.bootstrap((np.asarray(values),), np.median, confidence_level=CONFIDENCE,
                             n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                             rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass
class Comparison:
    """Candidates timed side by side in one case; ``pairs`` are (candidate, reference)."""

    section: str
    case: str
    timings: dict[str, Timing]
    pairs: list[tuple[str, str]]

    def ratio(self, candidate: str, reference: str) -> float:
        return self.timings[candidate].median_s / self.timings[reference].median_s

    def spread(self, candidate: str, reference: str) -> float:
        return max(self.timings[candidate].spread, self.timings[reference].spread)

    def paired_ratio(self, candidate: str, reference: str) -> tuple[float, tuple[float, float]]:
        """The median of the per-round ratios and its 95% bootstrap interval."""
        ratios = paired_ratios(self.timings[candidate], self.timings[reference])
        return float(np.median(ratios)), median_interval(ratios)


@dataclass
class Results:
    """What a benchmark run found: comparisons, facts (numbers that are not time ratios,
    such as a data-wait fraction), notes (skipped peers, caveats) and the run's context."""

    context: dict[str, Any] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def find(self, section: str, case_start: str) -> Comparison | None:
        """The first comparison of ``section`` whose case starts with ``case_start``."""
        for comparison in self.comparisons:
            if comparison.section == section and comparison.case.startswith(case_start):
                return comparison
        return None

    def ratio(self, section: str, case_start: str, candidate: str, reference: str
              ) -> float | None:
        """A ratio, or None when the case or a candidate was not measured (skipped)."""
        comparison = self.find(section, case_start)
        if comparison is None or not {candidate, reference} <= comparison.timings.keys():
            return None
        return comparison.ratio(candidate, reference)

    def paired(self, section: str, case_start: str, candidate: str, reference: str
               ) -> dict[str, Any]:
        """`Target` keyword arguments: the median per-round ratio and its interval (both
        None when the case or a candidate was not measured)."""
        comparison = self.find(section, case_start)
        if comparison is None or not {candidate, reference} <= comparison.timings.keys():
            return {"measured": None, "interval": None}
        measured, interval = comparison.paired_ratio(candidate, reference)
        return {"measured": measured, "interval": interval}


@dataclass
class Target:
    """One target of the performance issue: ``measured`` against ``limit``.

    ``at_most`` targets must stay at or below ``limit``, the others at or above it. A timed
    target has an ``interval`` (the 95% interval of ``measured``) and is decided by it:
    met when the whole interval is on the right side of the limit, missed when it is wholly
    on the wrong side, unresolved when it holds the limit. A target without an interval (a
    count, such as graphs compiled) is decided by ``measured`` alone. ``measured`` None
    means the benchmark could not measure it (a section not run, a peer not installed).
    """

    name: str
    measured: float | None
    limit: float
    at_most: bool = True
    what: str = ""  # how ``measured`` is obtained
    interval: tuple[float, float] | None = None

    def _within(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit

    def verdict(self) -> str:
        """met | missed | unresolved | not measured."""
        if self.measured is None or math.isnan(self.measured):
            return "not measured"
        low, high = self.interval if self.interval is not None else (self.measured, self.measured)
        if math.isnan(low) or math.isnan(high):
            return "not measured"
        worst, best = (high, low) if self.at_most else (low, high)
        if self._within(worst):
            return "met"
        if not self._within(best):
            return "missed"
        return "unresolved"

    @property
    def met(self) -> bool | None:
        """True when met, False when missed, None when unresolved or not measured."""
        return {"met": True, "missed": False}.get(self.verdict())

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured,
                "interval": None if self.interval is None else list(self.interval),
                "limit": self.limit, "at_most": self.at_most, "what": self.what,
                "verdict": self.verdict(), "met": self.met}


def evaluate_targets(results: Results) -> list[Target]:
    """The issue's targets, read off the measured comparisons and facts."""
    r = results.paired
    targets = [
        Target("framework overhead: method none vs bare PyTorch loop (lenet)",
               **r("steps", "lenet", "none", "bare loop"), limit=1.03,
               what="train_step with no method / hand-written step, same model and data"),
    ]
    for model in ("resnet18", "vit_tiny", "mixer"):
        targets.append(Target(
            f"framework overhead: method none vs bare PyTorch loop ({model})",
            **r("steps", model, "none", "bare loop"), limit=1.03,
            what="train_step with no method / hand-written step"))
    for width in (1024, 4096):
        case = f"gyro dropout p=0.5 sigma=256 tau=16, 256x{width}"
        targets.append(Target(f"gyro layer vs nn.Dropout (d={width})",
                              **r("layers", case, "GyroDropout", "nn.Dropout"), limit=1.0,
                              what="forward + backward, same input"))
        composer = r("layers", case, "Composer GyroDropoutLayer", "GyroDropout")
        targets.append(Target(f"gyro layer: Composer's GyroDropoutLayer time / regdrop's (d={width})",
                              **composer, limit=2.0, at_most=False,
                              what="at least 2: regdrop at least 2x faster"))
    targets += [
        Target("stochastic depth, sample-wise vs none (ResNet-50)",
               **r("layers", "resnet50", "regdrop sample", "no stochastic depth"), limit=1.05,
               what="forward + backward of the same ResNet-50; Composer's card: 1.05"),
        Target("stochastic depth, sample-wise vs none (resnet18 whole step)",
               **r("steps", "resnet18", "s.d. sample", "none"), limit=1.05,
               what="train_step"),
        Target("stochastic depth, block-wise linear 0.5 vs none (resnet18 whole step)",
               **r("steps", "resnet18", "s.d. block", "none"), limit=0.85, what="train_step"),
        Target("stochastic depth, block-wise linear 0.5 vs none (ResNet-50)",
               **r("layers", "resnet50", "regdrop block", "no stochastic depth"), limit=0.85,
               what="forward + backward"),
        Target("stochastic depth, block-wise: regdrop / Composer (ResNet-50)",
               **r("layers", "resnet50", "regdrop block", "Composer block"), limit=1.0,
               what="at most 1: at least as fast as Composer's blocks"),
        Target("stochastic depth, sample-wise: regdrop / Composer (ResNet-50)",
               **r("layers", "resnet50", "regdrop sample", "Composer sample"), limit=1.0,
               what="at most 1: at least as fast as Composer's blocks"),
        Target("multi-sample dropout M=8 vs M=1 (resnet18 head, whole step)",
               **r("steps", "resnet18", "multisample M=8", "multisample M=1"), limit=1.10,
               what="train_step"),
    ]
    targets += [
        Target("data parallelism: DDP step, stop flag at log flushes / broadcast every step",
               **r("ddp", "no method", "after: DDP, flag at log flushes",
                   "before: stop-flag broadcast every step"), limit=1.0,
               what="2 gloo processes, resnet18 step; at most 1: the change costs nothing"),
        Target("data parallelism, block-wise s.d.: flat all-reduce / DDP find_unused_parameters",
               **r("ddp", "block-wise", "after: flat gradient all-reduce",
                   "before: DDP find_unused_parameters"), limit=1.0,
               what="2 gloo processes, resnet18 step; at most 1: the change costs nothing"),
    ]
    compile_facts = results.facts.get("compile")
    recompiles = None
    if compile_facts is not None:
        recompiles = float(compile_facts["graphs_after_warmup"])
    targets.append(Target("early-linear schedule under torch.compile: graphs compiled after "
                          "the first step", recompiles, limit=0.0,
                          what="rate moved from the peak to 0 over the run"))
    fashion = results.facts.get("data", {}).get("fashion_mnist")
    targets.append(Target("waiting for data: fraction of a Fashion-MNIST epoch",
                          None if fashion is None else fashion["wait_fraction"], limit=0.05,
                          what="time in the loader / epoch wall time (in-memory loader)"))
    return targets


# -- output --------------------------------------------------------------------------------


def comparison_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for comparison in results.comparisons:
        for candidate, reference in comparison.pairs:
            paired, interval = comparison.paired_ratio(candidate, reference)
            rows.append({
                "section": comparison.section, "case": comparison.case,
                "candidate": candidate, "reference": reference,
                "candidate_ms": comparison.timings[candidate].median_s * 1e3,
                "reference_ms": comparison.timings[reference].median_s * 1e3,
                "ratio": comparison.ratio(candidate, reference),
                "spread": comparison.spread(candidate, reference),
                "paired_ratio": paired,
                "paired_interval": list(interval),
            })
    return rows


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _fmt_interval(value: float, interval: tuple[float, float] | list[float] | None) -> str:
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def table(results: Results) -> str:
    """The comparisons as a Markdown table (also readable as plain text)."""
    lines = ["| section | case | candidate | reference | candidate ms | reference ms | ratio | spread "
             "| paired ratio [95% interval] |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row in comparison_rows(results):
        lines.append(
            f"| {row['section']} | {row['case']} | {row['candidate']} | {row['reference']} "
            f"| {_fmt_ms(row['candidate_ms'])} | {_fmt_ms(row['reference_ms'])} "
            f"| {row['ratio']:.3f} | {row['spread']:.0%} "
            f"| {_fmt_interval(row['paired_ratio'], row['paired_interval'])} |")
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    lines = ["| target | measured [95% interval] | limit | verdict |", "|---|---:|---:|---|"]
    for target in targets:
        measured = "-" if target.measured is None else _fmt_interval(target.measured, target.interval)
        bound = ("<= " if target.at_most else ">= ") + f"{target.limit:g}"
        lines.append(f"| {target.name} | {measured} | {bound} | {target.verdict()} |")
    return "\n".join(lines)


def facts_lines(results: Results) -> list[str]:
    lines = []
    for name, facts in results.facts.get("data", {}).items():
        lines.append(
            f"- data, {name}: {facts['steps']} steps in {facts['wall_s']:.2f} s, "
            f"{facts['wait_s']:.3f} s waiting for batches = {facts['wait_fraction']:.1%} "
            f"({facts['setting']})")
    compile_facts = results.facts.get("compile")
    if compile_facts:
        lines.append(
            f"- compile ({compile_facts['setting']}): {compile_facts['graphs']} graph(s) over "
            f"{compile_facts['steps']} steps, the last compiled at step "
            f"{compile_facts['last_compile_step']} (steps until no more recompiles: "
            f"{compile_facts['last_compile_step'] + 1}); first step {compile_facts['first_step_s']:.1f} s")
    return lines


def markdown(results: Results) -> str:
    context = results.context
    head = [
        "# regdrop benchmark",
        "",
        f"- command: `{context.get('command', '')}`",
        f"- date: {context.get('date', '')}",
        f"- machine: {context.get('machine', '')}",
        f"- software: {context.get('software', '')}",
        f"- settings: {context.get('settings', '')}",
        f"- load average before / after: {context.get('load_before', '')} / "
        f"{context.get('load_after', '')}; wall time {context.get('wall_s', 0):.0f} s",
        "",
        "Ratio = candidate median time / reference median time (below 1: the candidate is "
        "faster); spread = the larger relative interquartile range of the two; paired "
        "ratio = the median of the per-round ratios (candidate and reference are timed in "
        "the same rounds), with its 95% bootstrap interval. A target is met when its whole "
        "interval is on the right side of the limit, missed when wholly on the wrong side, "
        "unresolved when the interval holds the limit.",
        "",
        "## Targets",
        "",
        targets_table(results.targets),
        "",
        "## Measurements",
        "",
        table(results),
        "",
    ]
    facts = facts_lines(results)
    if facts:
        head += ["## Data and compile", "", *facts, ""]
    if results.notes:
        head += ["## Notes", "", *(f"- {note}" for note in results.notes), ""]
    return "\n".join(head)


def to_json(results: Results) -> dict[str, Any]:
    return {
        "context": results.context,
        "comparisons": [
            {"section": c.section, "case": c.case,
             "timings": {name: t.as_dict() for name, t in c.timings.items()},
             "pairs": [list(p) for p in c.pairs]}
            for c in results.comparisons
        ],
        "ratios": comparison_rows(results),
        "facts": results.facts,
        "targets": [t.as_dict() for t in results.targets],
        "notes": results.notes,
    }


def write(results: Results, out: Path) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "bench.md"
    json_path.write_text(json.dumps(to_json(results), indent=2) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path
