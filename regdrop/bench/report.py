"""The benchmark's results: comparisons of timed candidates, measured facts, the targets of
the performance issue, and how they are printed (a plain table), saved (JSON) and written
up (Markdown).

Every ratio is the candidate's median time divided by its reference's: below 1 the
candidate is faster. A comparison's ``spread`` is the larger of the two relative
interquartile ranges, to say how far a ratio can be trusted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regdrop.bench.timing import Timing


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


@dataclass
class Target:
    """One target of the performance issue: ``measured`` against ``limit``.

    ``at_most`` targets are met when ``measured <= limit``, the others when ``measured >=
    limit``. ``measured`` None means the benchmark could not measure it (a section not
    run, a peer not installed).
    """

    name: str
    measured: float | None
    limit: float
    at_most: bool = True
    what: str = ""  # how ``measured`` is obtained

    @property
    def met(self) -> bool | None:
        if self.measured is None or math.isnan(self.measured):
            return None
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit

    def verdict(self) -> str:
        return {True: "met", False: "missed", None: "not measured"}[self.met]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured, "limit": self.limit,
                "at_most": self.at_most, "what": self.what, "met": self.met}


def evaluate_targets(results: Results) -> list[Target]:
    """The issue's targets, read off the measured comparisons and facts."""
    r = results.ratio
    targets = [
        Target("framework overhead: method none vs bare PyTorch loop (lenet)",
               r("steps", "lenet", "none", "bare loop"), 1.03,
               what="train_step with no method / hand-written step, same model and data"),
    ]
    for model in ("resnet18", "vit_tiny", "mixer"):
        targets.append(Target(
            f"framework overhead: method none vs bare PyTorch loop ({model})",
            r("steps", model, "none", "bare loop"), 1.03,
            what="train_step with no method / hand-written step"))
    for width in (1024, 4096):
        case = f"gyro dropout p=0.5 sigma=256 tau=16, 256x{width}"
        targets.append(Target(f"gyro layer vs nn.Dropout (d={width})",
                              r("layers", case, "GyroDropout", "nn.Dropout"), 1.0,
                              what="forward + backward, same input"))
        composer = r("layers", case, "Composer GyroDropoutLayer", "GyroDropout")
        targets.append(Target(f"gyro layer: Composer's GyroDropoutLayer time / regdrop's (d={width})",
                              composer, 2.0, at_most=False,
                              what="at least 2: regdrop at least 2x faster"))
    targets += [
        Target("stochastic depth, sample-wise vs none (ResNet-50)",
               r("layers", "resnet50", "regdrop sample", "no stochastic depth"), 1.05,
               what="forward + backward of the same ResNet-50; Composer's card: 1.05"),
        Target("stochastic depth, sample-wise vs none (resnet18 whole step)",
               r("steps", "resnet18", "s.d. sample", "none"), 1.05,
               what="train_step"),
        Target("stochastic depth, block-wise linear 0.5 vs none (resnet18 whole step)",
               r("steps", "resnet18", "s.d. block", "none"), 0.85, what="train_step"),
        Target("stochastic depth, block-wise linear 0.5 vs none (ResNet-50)",
               r("layers", "resnet50", "regdrop block", "no stochastic depth"), 0.85,
               what="forward + backward"),
        Target("stochastic depth, block-wise: regdrop / Composer (ResNet-50)",
               r("layers", "resnet50", "regdrop block", "Composer block"), 1.0,
               what="at most 1: at least as fast as Composer's blocks"),
        Target("stochastic depth, sample-wise: regdrop / Composer (ResNet-50)",
               r("layers", "resnet50", "regdrop sample", "Composer sample"), 1.0,
               what="at most 1: at least as fast as Composer's blocks"),
        Target("multi-sample dropout M=8 vs M=1 (resnet18 head, whole step)",
               r("steps", "resnet18", "multisample M=8", "multisample M=1"), 1.10,
               what="train_step"),
    ]
    compile_facts = results.facts.get("compile")
    recompiles = None
    if compile_facts is not None:
        recompiles = float(compile_facts["graphs_after_warmup"])
    targets.append(Target("early-linear schedule under torch.compile: graphs compiled after "
                          "the first step", recompiles, 0.0,
                          what="rate moved from the peak to 0 over the run"))
    fashion = results.facts.get("data", {}).get("fashion_mnist")
    targets.append(Target("waiting for data: fraction of a Fashion-MNIST epoch",
                          None if fashion is None else fashion["wait_fraction"], 0.05,
                          what="time in the loader / epoch wall time (in-memory loader)"))
    return targets


# -- output --------------------------------------------------------------------------------


def comparison_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for comparison in results.comparisons:
        for candidate, reference in comparison.pairs:
            rows.append({
                "section": comparison.section, "case": comparison.case,
                "candidate": candidate, "reference": reference,
                "candidate_ms": comparison.timings[candidate].median_s * 1e3,
                "reference_ms": comparison.timings[reference].median_s * 1e3,
                "ratio": comparison.ratio(candidate, reference),
                "spread": comparison.spread(candidate, reference),
            })
    return rows


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def table(results: Results) -> str:
    """The comparisons as a Markdown table (also readable as plain text)."""
    lines = ["| section | case | candidate | reference | candidate ms | reference ms | ratio | spread |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for row in comparison_rows(results):
        lines.append(
            f"| {row['section']} | {row['case']} | {row['candidate']} | {row['reference']} "
            f"| {_fmt_ms(row['candidate_ms'])} | {_fmt_ms(row['reference_ms'])} "
            f"| {row['ratio']:.3f} | {row['spread']:.0%} |")
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    lines = ["| target | measured | limit | verdict |", "|---|---:|---:|---|"]
    for target in targets:
        measured = "-" if target.measured is None else f"{target.measured:.3f}"
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
        "faster); spread = the larger relative interquartile range of the two.",
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
