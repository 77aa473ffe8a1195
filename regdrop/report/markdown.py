"""The text of ``report.md``: the table in the paper's layout, every cell's numbers, the
figures, and every job that is not in the numbers, named."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from regdrop.report.evidence import ClaimResult, RegimeResult, cell_summary
from regdrop.report.runs import FINISHED, ExpectedJob, Job
from regdrop.report.stats import INCONCLUSIVE, MAX_SEEDS, PAIRED, TOO_FEW, Summary, describe
from regdrop.report.table import (
    ACCURACY_METRICS,
    METRICS,
    Cell,
    Layout,
    Stat,
    in_unit,
    markdown_table,
    metric_header,
)


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)


def _digits(metric: str) -> int:
    return 2 if metric in ACCURACY_METRICS else 4


def _paper(layout: Layout, cell: Cell) -> float | None:
    return layout.spec.reference.get(cell.row, {}).get(cell.column)


def metric_stat(layout: Layout, cell: Cell, metric: str) -> Stat:
    spec = layout.spec
    return Stat.of([in_unit(v, metric, spec.as_error) for v in cell.values(metric)])


def main_table(layout: Layout) -> str:
    """Rows and columns as the paper lays them out: ours (mean ± std, n), the paper's value
    where it has one, and the final-epoch test accuracy when the metric is another one."""
    spec = layout.spec
    has_paper = {c: any(cols.get(c) is not None for cols in spec.reference.values())
                 for c in layout.columns}
    show_final = spec.metric != "test/acc"
    final_header = metric_header("test/acc", spec.as_error)
    single = layout.columns == ["all"]
    header = [" / ".join(layout.row_keys + layout.extra_keys) or "runs"]
    for column in layout.columns:
        prefix = "" if single else f"{column}: "
        header.append(f"{prefix}ours, {metric_header(spec.metric, spec.as_error)}")
        if has_paper[column]:
            header.append(f"{prefix}paper")
        if show_final:
            header.append(f"{prefix}{final_header}")
    rows = []
    for row in layout.rows:
        line = [row]
        for column in layout.columns:
            cell = layout.cells.get((row, column))
            if cell is None:
                line += ["no runs"] + [""] * (has_paper[column] + show_final)
                continue
            stat = metric_stat(layout, cell, spec.metric)
            ours = stat.text(_digits(spec.metric))
            if cell.problems():
                ours = (f"{ours} — {cell.problems()}" if stat.mean is not None
                        else f"— ({cell.problems()})")
            line.append(ours)
            if has_paper[column]:
                paper = _paper(layout, cell)
                line.append("" if paper is None else f"{paper:g}")
            if show_final:
                line.append(metric_stat(layout, cell, "test/acc").text(2, with_n=False))
        rows.append(line)
    return markdown_table(header, rows)


def cell_table(layout: Layout) -> str:
    """One line per cell: every number the report has for it."""
    spec = layout.spec
    digits = _digits(spec.metric)
    has_paper = any(v is not None for cols in spec.reference.values() for v in cols.values())
    cell_keys = " / ".join(layout.row_keys + layout.extra_keys) or "runs"
    if layout.columns != ["all"]:
        cell_keys += f" [{' / '.join(layout.column_keys)}]"
    header = [cell_keys, "n", metric_header(spec.metric, spec.as_error), "95% CI"]
    if has_paper:
        header += ["paper", "ours − paper"]
    show_final = spec.metric != "test/acc"
    if show_final:
        header.append(metric_header("test/acc", spec.as_error))
    header += ["final train loss", "train s/epoch", "wall s/epoch"]
    if spec.loss_target is not None:
        header.append(f"steps to train loss ≤ {spec.loss_target:g} "
                      f"(mean of {spec.loss_window} steps)")
    header += ["seeds", "per seed"]
    rows = []
    for cell in layout.ordered_cells():
        ours = metric_stat(layout, cell, spec.metric)
        paper = _paper(layout, cell)
        delta = "" if paper is None or ours.mean is None else f"{ours.mean - paper:+.{digits}f}"
        interval = describe([in_unit(v, spec.metric, spec.as_error)
                             for v in cell.values(spec.metric)])
        line = [cell.label, str(len(cell.finished)), ours.text(digits, with_n=False),
                _interval(interval, digits)]
        if has_paper:
            line += ["" if paper is None else f"{paper:g}", delta]
        if show_final:
            line.append(metric_stat(layout, cell, "test/acc").text(2, with_n=False))
        line += [Stat.of(cell.values("train/loss")).text(4, with_n=False),
                Stat.of(cell.per_epoch("train_time_s")).text(1, with_n=False),
                Stat.of(cell.per_epoch("wall_time_s")).text(1, with_n=False)]
        if spec.loss_target is not None:
            reached = cell.steps_to_loss(spec.loss_target, spec.loss_window)
            text = Stat.of(reached).text(0, with_n=False)
            never = sum(r is None for r in reached)
            line.append(text + (f" ({never} never)" if never else ""))
        line.append(", ".join(str(job.seed) for job in cell.finished) or "—")
        line.append(", ".join("—" if v is None else f"{v:.{digits}f}"
                              for v in interval.values) or "—")
        rows.append(line)
    return markdown_table(header, rows)


def _interval(summary: Summary, digits: int) -> str:
    if summary.ci_low is None:
        return "—"
    return f"[{summary.ci_low:.{digits}f}, {summary.ci_high:.{digits}f}]"


def _mean_sd(summary: Summary, digits: int) -> str:
    if summary.mean is None:
        return "—"
    sd = "" if summary.sd is None else f" ± {summary.sd:.{digits}f}"
    return f"{summary.mean:.{digits}f}{sd}"


def regime_table(layout: Layout) -> str:
    """Every row: the final training loss and accuracy beside the test loss and accuracy,
    and the gap (train acc. - test acc.), mean ± sd over the finished seeds."""
    cell_keys = " / ".join(layout.row_keys + layout.extra_keys) or "runs"
    if layout.columns != ["all"]:
        cell_keys += f" [{' / '.join(layout.column_keys)}]"
    header = [cell_keys, "n", "final train loss", "final test loss", "final train acc. (%)",
              "final test acc. (%)", "train − test acc. (points)"]
    rows = []
    for cell in layout.ordered_cells():
        label = cell.label + (" (baseline)" if cell.row == layout.spec.baseline else "")
        rows.append([label, str(len(cell.finished)),
                     _mean_sd(cell_summary(cell, "train/loss"), 4),
                     _mean_sd(cell_summary(cell, "test/loss"), 4),
                     _mean_sd(cell_summary(cell, "train/acc"), 2),
                     _mean_sd(cell_summary(cell, "test/acc"), 2),
                     _mean_sd(cell_summary(cell, "gap/acc"), 2)])
    return markdown_table(header, rows)


def regime_lines(layout: Layout, regimes: Sequence[RegimeResult]) -> list[str]:
    spec = layout.spec
    if not regimes:
        return ["The table section names no regime for its claims."
                + ("" if spec.baseline else " It names no baseline row either.")]
    lines = []
    for result in regimes:
        where = "" if result.column == "all" else f" in column `{result.column}`"
        threshold = 100 * result.regime.gap
        side = "above" if result.regime.needs == "overfitting" else "below"
        if result.holds is None:
            found = "the baseline has no finished run there: cannot tell"
        else:
            found = (f"the baseline's gap is {_mean_sd(result.gap, 2)} points "
                     f"(n={result.gap.n}, 95% CI {_interval(result.gap, 2)}): "
                     + ("**in the regime**" if result.holds else "**not in the regime**"))
        lines.append(f"- {result.regime.needs}{where} (the mean gap of `{spec.baseline}` "
                     f"{side} {threshold:g} points): {found}.")
    return lines


def seeds_text(needed: int | None) -> str:
    """How many seeds per row would find the observed difference at 80% power."""
    if needed is None:
        return "no difference observed to size seeds by"
    if needed > MAX_SEEDS:
        return f"more than {MAX_SEEDS:,} seeds per row would be needed for the observed difference"
    return f"about {needed} seeds per row would find the observed difference"


def claims_table(results: Sequence[ClaimResult]) -> str:
    header = ["claim", "paper", "metric", "better − than", "95% CI", "p", "test", "n",
              "verdict"]
    rows = []
    for result in results:
        claim, comparison = result.claim, result.comparison
        digits = 2 if claim.metric in ACCURACY_METRICS else 4
        where = "" if result.column == "all" else f" [{result.column}]"
        sign = ">" if claim.higher_is_better else "<"
        text = comparison.verdict
        if comparison.verdict == INCONCLUSIVE and comparison.detectable is not None:
            text += (f" (detectable at 80% power: {comparison.detectable:.{digits}f}"
                     f"{' points' if claim.metric in ACCURACY_METRICS else ''}; "
                     f"{seeds_text(comparison.seeds_needed)})")
        if comparison.verdict == TOO_FEW:
            text += f" ({result.why_not_paired or 'fewer than 2 seeds in a row'})"
        n = (f"{comparison.n_better} pairs" if comparison.test == PAIRED
             else f"{comparison.n_better} vs {comparison.n_than}")
        rows.append([
            f"{claim.better} {sign} {claim.than}{where}", claim.paper or "",
            f"`{claim.metric}`",
            "—" if comparison.difference is None else f"{comparison.difference:+.{digits}f}",
            _interval(Summary(0, None, None, comparison.ci_low, comparison.ci_high, ()),
                      digits),
            "—" if comparison.p_value is None else f"{comparison.p_value:.3g}",
            comparison.test, n, text])
    return markdown_table(header, rows, align=["l", "l", "l", "r", "r", "r", "l", "r", "l"])


def claims_lines(results: Sequence[ClaimResult]) -> list[str]:
    if not results:
        return ["The table section states no claim."]
    lines = [
        "Each claim: the difference of the two rows' means (better − than; accuracies in "
        "percentage points), its 95% confidence interval and the two-sided p-value. The "
        "test is paired by seed where every seed of both rows finished: the same seed gives "
        "the same initial weights and the same data order here, so a pair differs only by "
        "the method; otherwise Welch's t test. Verdict from the interval alone: **held** "
        "(it excludes 0 in the paper's direction), **contradicted** (it excludes 0 the "
        "other way), **inconclusive** (it contains 0; the smallest difference these seeds "
        "could detect with 80% power at alpha 0.05 is given).",
        "",
        claims_table(results),
        ""]
    unpaired = [r for r in results if r.why_not_paired and r.comparison.n_better]
    lines += [f"- `{r.claim.better}` vs `{r.claim.than}`: Welch, {r.why_not_paired}."
              for r in unpaired]
    return lines


def _missing_row(label: str, expected: ExpectedJob, out: Path) -> list[str]:
    return [label, expected.seed, expected.status, _rel(expected.sweep.root, out), "",
            expected.detail]


def problem_table(layout: Layout, missing: Sequence[ExpectedJob], out: Path) -> str:
    """Every job that is not in the numbers, and every expected job with no folder (those in
    a cell with the cell, ``missing`` those with no cell)."""
    rows = []
    for cell in layout.ordered_cells():
        for job in cell.unfinished:
            rows.append([cell.label, str(job.seed), job.status, _rel(job.path, out),
                         "" if job.last_step is None else str(job.last_step), job.detail])
        for job in cell.duplicates:
            rows.append([cell.label, str(job.seed), "finished, not counted",
                         _rel(job.path, out), str(job.last_step),
                         "another finished job of this cell has the same seed (the newest "
                         "counts)"])
        for expected in cell.missing:
            rows.append(_missing_row(cell.label, expected, out))
    for expected in missing:
        rows.append(_missing_row(expected.label(), expected, out))
    if not rows:
        return "Every job finished; every job the sweeps launch has its folder."
    return markdown_table(["cell", "seed", "status", "folder", "last step", "detail"], rows,
                          align=["l", "r", "l", "l", "r", "l"])


def render(layout: Layout, jobs: Sequence[Job], missing: Sequence[ExpectedJob],
           roots: Sequence[Path], out: Path, figures: Sequence[tuple[str, Path]],
           notes: Sequence[str], claims: Sequence[ClaimResult] = (),
           regimes: Sequence[RegimeResult] = (), made: str | None = None) -> str:
    """The whole ``report.md``."""
    spec = layout.spec
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    status_text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(),
                                                          key=lambda kv: kv[0] != FINISHED))
    n_missing = len(missing) + sum(len(cell.missing) for cell in layout.cells.values())
    lines = [f"# {spec.title or 'Report'}", ""]
    if spec.source:
        lines += [f"Paper: {spec.source}.", ""]
    sources = ", ".join(f"`{_rel(root, out)}`" for root in roots)
    lines += [
        f"Read from {sources}: {len(jobs)} job(s), {status_text}"
        + (f"; {n_missing} job(s) the sweeps launch have no folder" if n_missing else "")
        + ".",
        f"Made by `regdrop-report` on {made or datetime.now().strftime('%Y-%m-%d %H:%M')}. "
        "Every number below is in `report.json`, every job's in `seeds.csv`.",
        "",
        "## Table",
        "",
        f"Metric: `{spec.metric}`, the {METRICS[spec.metric]}"
        + (", as test error 100 × (1 − acc.) in %" if spec.as_error
           else (", in %" if spec.metric in ACCURACY_METRICS else "")) + ". "
        "Ours: mean ± standard deviation over seeds (n = seeds that finished); only "
        "finished jobs count, the others are named after each number and listed below.",
        "",
        main_table(layout),
        "",
        "## Claims",
        "",
        *claims_lines(claims),
        "",
        "## Regime: training beside test",
        "",
        "Final training loss and accuracy are the last epoch's means over its steps, "
        "measured as logged: with dropout (and every other training-time method) on. Test "
        "numbers are the final evaluation. Mean ± sd over the finished seeds.",
        "",
        regime_table(layout),
        "",
        *regime_lines(layout, regimes),
        "",
    ]
    if layout.extra_keys:
        lines += [f"The rows also split by {', '.join(f'`{k}`' for k in layout.extra_keys)}: "
                  "swept, but not among the table's row or column keys.", ""]
    lines += [
        "## Every cell",
        "",
        "95% CI: mean ± t(0.975, n − 1) · sd / √n, the Student t interval of the mean. "
        "Final train loss: `train/loss` of metrics.json, the mean over the last epoch. "
        "Train s/epoch: time in training steps per epoch; wall s/epoch: the whole run's "
        "wall-clock (evaluation included) per epoch.",
        "",
        cell_table(layout),
        "",
    ]
    if figures:
        lines += ["## Figures", ""]
        for title, path in figures:
            lines += [f"![{title}]({Path(_rel(path, out)).as_posix()})", ""]
    lines += ["## Missing, failed, killed or still running", "",
              problem_table(layout, missing, out), ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)
