"""What the report concludes, as data: each cell's statistics, each claim of the ``table``
section tested (`regdrop.report.stats`), the baseline's regime, and the files that carry
every number (``report.json`` and the per-seed ``seeds.csv``)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regdrop.report.runs import FINISHED, ExpectedJob, Job, finite, format_value
from regdrop.report.stats import Comparison, Summary, compare, describe
from regdrop.report.table import (
    ACCURACY_METRICS,
    Cell,
    Claim,
    Layout,
    Regime,
    final_train_acc,
    in_unit,
)

# The per-cell numbers report.json carries (accuracies in %, losses as logged).
CELL_METRICS = ("best/test_acc", "test/acc", "test/loss", "train/acc", "train/loss",
                "gap/acc", "train_s_per_epoch", "wall_s_per_epoch")
PERCENT = ("best/test_acc", "test/acc", "train/acc", "gap/acc")


def percent(value: float | None, metric: str) -> float | None:
    """An accuracy (or accuracy gap) in %, other metrics unchanged."""
    return None if value is None else (100.0 * value if metric in PERCENT else value)


def job_value(job: Job, metric: str) -> float | None:
    """One finished job's ``metric`` in the report's unit (accuracies in %)."""
    summary = job.summary or {}
    if metric == "train/acc":
        raw = final_train_acc(job)
    elif metric == "gap/acc":
        train, test = final_train_acc(job), finite(summary.get("test/acc"))
        raw = None if train is None or test is None else train - test
    elif metric in ("train_s_per_epoch", "wall_s_per_epoch"):
        seconds = finite(summary.get("train_time_s" if metric.startswith("train")
                                     else "wall_time_s"))
        epochs = finite(summary.get("epoch"))
        raw = seconds / epochs if seconds is not None and epochs else None
    else:
        raw = finite(summary.get(metric))
    return percent(raw, metric)


def cell_values(cell: Cell, metric: str) -> list[float | None]:
    return [job_value(job, metric) for job in cell.finished]


def cell_summary(cell: Cell, metric: str) -> Summary:
    return describe(cell_values(cell, metric))


# -- claims -----------------------------------------------------------------------------------


@dataclass
class ClaimResult:
    """A claim tested: the two cells' summaries and the comparison of better - than."""

    index: int
    claim: Claim
    column: str
    better: Summary
    than: Summary
    comparison: Comparison
    paired_seeds: list[str]  # the seeds paired (empty for Welch)
    why_not_paired: str

    @property
    def unit(self) -> str:
        return "percentage points" if self.claim.metric in ACCURACY_METRICS else "loss"

    def as_dict(self) -> dict[str, Any]:
        return {"better": self.claim.better, "than": self.claim.than,
                "metric": self.claim.metric, "column": self.column, "paper": self.claim.paper,
                "direction": "higher" if self.claim.higher_is_better else "lower",
                "unit": self.unit, "better_cell": self.better.as_dict(),
                "than_cell": self.than.as_dict(), **self.comparison.as_dict(),
                "paired_seeds": self.paired_seeds, "why_not_paired": self.why_not_paired}


def _pairing(a: Cell | None, b: Cell | None) -> tuple[list[str], str]:
    """The seeds to pair, or why the comparison is unpaired (Welch)."""
    if a is None or b is None:
        return [], "a cell has no runs"
    for cell in (a, b):
        if not cell.complete:
            return [], f"not every seed of `{cell.label}` finished ({cell.problems()})"
    seeds_a = {format_value(j.seed) for j in a.finished}
    seeds_b = {format_value(j.seed) for j in b.finished}
    if seeds_a != seeds_b:
        return [], "the two rows ran different seeds"
    return sorted(seeds_a, key=lambda s: (len(s), s)), ""


def claim_results(layout: Layout) -> list[ClaimResult]:
    """Every claim of the table section, compared (paired by seed where both cells are
    complete with the same seeds, Welch otherwise)."""
    results = []
    for i, claim in enumerate(layout.spec.claims):
        column = claim.column or (layout.columns[0] if layout.columns else "all")
        a = layout.cells.get((claim.better, column))
        b = layout.cells.get((claim.than, column))
        seeds, why = _pairing(a, b)
        if seeds:
            by_a = {format_value(j.seed): job_value(j, claim.metric) for j in a.finished}
            by_b = {format_value(j.seed): job_value(j, claim.metric) for j in b.finished}
            better = [by_a[s] for s in seeds]
            than = [by_b[s] for s in seeds]
        else:
            better = cell_values(a, claim.metric) if a else []
            than = cell_values(b, claim.metric) if b else []
        comparison = compare(better, than, paired=bool(seeds),
                             higher_is_better=claim.higher_is_better)
        results.append(ClaimResult(i, claim, column, describe(better), describe(than),
                                   comparison, seeds, why))
    return results


# -- the regime -------------------------------------------------------------------------------


@dataclass
class RegimeResult:
    """The baseline's train - test accuracy gap (in %) in one column, against the regime's
    threshold: ``holds`` is True when the mean gap is on the regime's side of it."""

    regime: Regime
    column: str
    gap: Summary
    holds: bool | None

    def as_dict(self) -> dict[str, Any]:
        threshold = "min_gap" if self.regime.needs == "overfitting" else "max_gap"
        return {"needs": self.regime.needs, threshold: self.regime.gap, "column": self.column,
                "baseline_gap_percent": self.gap.as_dict(),
                "in_regime": self.holds}


def check_regime(layout: Layout) -> list[RegimeResult]:
    """Each regime on the baseline row, in its column (every column when it names none)."""
    spec = layout.spec
    results = []
    for regime in spec.regime:
        columns = [regime.column] if regime.column is not None else layout.columns
        for column in columns:
            cell = layout.cells.get((spec.baseline, column)) if spec.baseline else None
            gap = describe(cell_values(cell, "gap/acc") if cell else [])
            holds = None
            if gap.mean is not None:
                threshold = 100.0 * regime.gap
                holds = gap.mean > threshold if regime.needs == "overfitting" \
                    else gap.mean < threshold
            results.append(RegimeResult(regime, column, gap, holds))
    return results


# -- the files --------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON has no NaN: non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def job_status_row(job: Job) -> dict[str, Any]:
    return {"seed": format_value(job.seed), "status": job.status, "folder": str(job.path),
            "detail": job.detail}


def report_data(layout: Layout, jobs: Sequence[Job], missing: Sequence[ExpectedJob],
                claims: Sequence[ClaimResult], regimes: Sequence[RegimeResult],
                made: str) -> dict[str, Any]:
    """Everything report.json holds: every cell (its summaries and every seed), every claim,
    every regime check, and the jobs that have no cell."""
    spec = layout.spec
    cells = []
    for cell in layout.ordered_cells():
        seeds = []
        for job in cell.jobs:
            row = job_status_row(job)
            row["counted"] = job in cell.finished
            if job.status == FINISHED:
                row["values"] = {m: job_value(job, m) for m in CELL_METRICS}
            seeds.append(row)
        seeds += [{"seed": e.seed, "status": e.status, "folder": None, "detail": e.detail,
                   "counted": False} for e in cell.missing]
        entry = {"row": cell.row, "column": cell.column, "n": len(cell.finished),
                 "problems": cell.problems(), "complete": cell.complete,
                 "metrics": {m: cell_summary(cell, m).as_dict() for m in CELL_METRICS},
                 "table_metric": describe([in_unit(v, spec.metric, spec.as_error)
                                           for v in cell.values(spec.metric)]).as_dict(),
                 "seeds": seeds}
        if spec.loss_target is not None:
            entry["steps_to_loss"] = describe(
                cell.steps_to_loss(spec.loss_target, spec.loss_window)).as_dict()
            entry["steps_to_loss"]["never"] = sum(
                r is None for r in cell.steps_to_loss(spec.loss_target, spec.loss_window))
        cells.append(entry)
    placed = {id(j) for cell in layout.cells.values() for j in cell.jobs}
    return _clean({
        "title": spec.title, "source": spec.source, "made": made, "metric": spec.metric,
        "as_error": spec.as_error, "units": {m: "%" if m in PERCENT else "as logged"
                                             for m in CELL_METRICS},
        "baseline": spec.baseline, "loss_target": spec.loss_target,
        "loss_window": spec.loss_window, "rows": layout.rows, "columns": layout.columns,
        "cells": cells,
        "claims": [c.as_dict() for c in claims],
        "regime": [r.as_dict() for r in regimes],
        "jobs_without_cell": [job_status_row(j) for j in jobs if id(j) not in placed]
        + [{"seed": e.seed, "status": e.status, "folder": None, "detail": e.detail}
           for e in missing],
    })


def seeds_csv(layout: Layout, jobs: Sequence[Job]) -> str:
    """One line per job: row, column, seed, status, folder, detail, and every summary
    metric of its metrics.json (as logged) with the final training accuracy."""
    keys = sorted({k for job in jobs if job.summary for k, v in job.summary.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)})
    header = ["row", "column", "seed", "status", "counted", "folder", "detail",
              "final_train_acc", *keys]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    placed = set()
    for cell in layout.ordered_cells():
        for job in cell.jobs:
            placed.add(id(job))
            summary = job.summary or {}
            writer.writerow([cell.row, cell.column, format_value(job.seed), job.status,
                             job in cell.finished, job.path, job.detail,
                             _csv_number(final_train_acc(job)),
                             *(_csv_number(summary.get(k)) for k in keys)])
        for expected in cell.missing:
            writer.writerow([cell.row, cell.column, expected.seed, expected.status, False, "",
                             expected.detail, "", *([""] * len(keys))])
    for job in jobs:
        if id(job) not in placed:
            writer.writerow(["", "", format_value(job.seed), job.status, False, job.path,
                             job.detail, "", *([""] * len(keys))])
    return out.getvalue()


def _csv_number(value: Any) -> str:
    number = finite(value) if not isinstance(value, bool) else None
    return "" if number is None else repr(number)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so a failed
    write never leaves a torn file where a whole one was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, allow_nan=False) + "\n"
