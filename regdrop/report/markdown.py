"""The text of ``report.md``: the table in the paper's layout, every cell's numbers, the
figures, and every job that is not in the numbers, named."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from regdrop.report.runs import FINISHED, ExpectedJob, Job
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
    header = [cell_keys, "n", metric_header(spec.metric, spec.as_error)]
    if has_paper:
        header += ["paper", "ours − paper"]
    show_final = spec.metric != "test/acc"
    if show_final:
        header.append(metric_header("test/acc", spec.as_error))
    header += ["final train loss", "train s/epoch", "wall s/epoch"]
    if spec.loss_target is not None:
        header.append(f"steps to train loss ≤ {spec.loss_target:g}")
    header.append("seeds")
    rows = []
    for cell in layout.ordered_cells():
        ours = metric_stat(layout, cell, spec.metric)
        paper = _paper(layout, cell)
        delta = "" if paper is None or ours.mean is None else f"{ours.mean - paper:+.{digits}f}"
        line = [cell.label, str(len(cell.finished)), ours.text(digits, with_n=False)]
        if has_paper:
            line += ["" if paper is None else f"{paper:g}", delta]
        if show_final:
            line.append(metric_stat(layout, cell, "test/acc").text(2, with_n=False))
        line += [Stat.of(cell.values("train/loss")).text(4, with_n=False),
                Stat.of(cell.per_epoch("train_time_s")).text(1, with_n=False),
                Stat.of(cell.per_epoch("wall_time_s")).text(1, with_n=False)]
        if spec.loss_target is not None:
            reached = cell.steps_to_loss(spec.loss_target)
            text = Stat.of(reached).text(0, with_n=False)
            never = sum(r is None for r in reached)
            line.append(text + (f" ({never} never)" if never else ""))
        line.append(", ".join(str(job.seed) for job in cell.finished) or "—")
        rows.append(line)
    return markdown_table(header, rows)


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
           notes: Sequence[str]) -> str:
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
        f"Made by `regdrop-report` on {datetime.now().strftime('%Y-%m-%d %H:%M')}.",
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
    ]
    if layout.extra_keys:
        lines += [f"The rows also split by {', '.join(f'`{k}`' for k in layout.extra_keys)}: "
                  "swept, but not among the table's row or column keys.", ""]
    lines += [
        "## Every cell",
        "",
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
