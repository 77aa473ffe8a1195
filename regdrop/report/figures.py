"""The report's figures: curves per cell, mean over seeds with a band of one standard
deviation, one panel per table column (matplotlib's object API, no display needed)."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from regdrop.report.runs import Job, finite
from regdrop.report.table import Layout, in_unit

# (x, y) points of one job.
Points = dict[float, float]


def test_metric_points(job: Job, layout: Layout) -> Points:
    """Test accuracy (or error, as the table reports it) in %, per evaluated epoch."""
    spec = layout.spec
    points: Points = {}
    for record in job.evals:
        acc, epoch = finite(record.get("test/acc")), finite(record.get("epoch"))
        if acc is not None and epoch is not None:
            points[epoch] = in_unit(acc, "test/acc", spec.as_error)
    return points


def epoch_loss_points(job: Job, layout: Layout) -> Points:
    """The mean training loss of each epoch, from the step records (every epoch has them,
    evaluated or not)."""
    by_epoch: dict[float, list[float]] = {}
    for record in job.train:
        loss, epoch = finite(record.get("train/loss")), finite(record.get("epoch"))
        if loss is not None and epoch is not None:
            by_epoch.setdefault(epoch, []).append(loss)
    return {epoch: statistics.fmean(losses) for epoch, losses in by_epoch.items()}


def step_loss_points(job: Job, layout: Layout) -> Points:
    """The training loss against optimizer steps, as a trailing mean over about 2% of the
    run (single-batch losses are too noisy to compare methods by eye)."""
    steps = [(r["step"], v) for r in job.train if (v := finite(r.get("train/loss"))) is not None]
    window = max(1, len(steps) // 50)
    points: Points = {}
    total = 0.0
    for i, (step, loss) in enumerate(steps):
        total += loss
        if i >= window:
            total -= steps[i - window][1]
        points[float(step)] = total / min(i + 1, window)
    return points


def drop_rate_points(job: Job, layout: Layout) -> Points:
    """The drop rate in force at each optimizer step."""
    return {float(r["step"]): rate for r in job.train
            if (rate := finite(r.get("train/drop_rate"))) is not None}


def diagnostics_points(key: str) -> Callable[[Job, Layout], Points]:
    """``key`` (``diag/gdv``, ``diag/gde``) of the run's diagnostics against the step."""
    def points(job: Job, layout: Layout) -> Points:
        return {float(r["step"]): value for r in job.diagnostics if (value := finite(r.get(key))) is not None}

    return points


FIGURES: list[tuple[str, str, str, str, Callable[[Job, Layout], Points]]] = [
    # (file name, title, x label, y label, points)
    ("test_acc.png", "Test accuracy", "epoch", "test acc. (%)", test_metric_points),
    ("train_loss.png", "Training loss (epoch mean)", "epoch", "train loss", epoch_loss_points),
    ("loss_vs_steps.png", "Training loss against iterations", "optimizer step", "train loss",
     step_loss_points),
    ("drop_rate.png", "Drop-rate schedule", "optimizer step", "drop rate", drop_rate_points),
    # Only drawn for runs with diagnostics on (Liu et al.'s measurements).
    ("gdv.png", "Gradient direction variance", "optimizer step", "GDV", diagnostics_points("diag/gdv")),
    ("gde.png", "Gradient direction error", "optimizer step", "GDE", diagnostics_points("diag/gde")),
]


def mean_and_spread(curves: Sequence[Points]) -> tuple[list[float], list[float], list[float]]:
    """x, mean and standard deviation over the curves at every x any of them has (the
    standard deviation is 0 where only one curve has a point)."""
    xs = sorted({x for curve in curves for x in curve})
    means, stds = [], []
    for x in xs:
        values = [curve[x] for curve in curves if x in curve]
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return xs, means, stds


def draw_figures(layout: Layout, out_dir: Path) -> list[tuple[str, Path]]:
    """Draw every figure of `FIGURES` for the cells with finished jobs into ``out_dir``;
    return (title, path) of each figure written."""
    from matplotlib.figure import Figure

    colors = {row: f"C{i % 10}" for i, row in enumerate(layout.rows)}
    written = []
    for name, title, x_label, y_label, points in FIGURES:
        if name == "test_acc.png" and layout.spec.as_error:
            title, y_label = "Test error", "test error (%)"
        # Each cell's curves, computed once; a panel per column that has any (diagnostics
        # may be on in one column only).
        curves_of = {key: curves for key, cell in layout.cells.items()
                     if (curves := [c for c in (points(job, layout) for job in cell.finished) if c])}
        columns = [c for c in layout.columns if any((row, c) in curves_of for row in layout.rows)]
        if not columns:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        ncols = min(len(columns), 3)
        nrows = math.ceil(len(columns) / ncols)
        width = 4.6 * ncols
        fig = Figure(figsize=(width, 3.3 * nrows), dpi=110)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, column in zip(axes.flat, columns, strict=False):
            for row in layout.rows:
                curves = curves_of.get((row, column))
                if curves is None:
                    continue
                xs, means, stds = mean_and_spread(curves)
                label = f"{row} (n={len(curves)})"
                if len(xs) == 1:
                    ax.errorbar(xs, means, yerr=stds, fmt="o", color=colors[row], label=label)
                else:
                    # A drop rate holds until the next step: draw it as steps.
                    style = "steps-post" if points is drop_rate_points else "default"
                    ax.plot(xs, means, color=colors[row], lw=1.5, label=label, drawstyle=style)
                    ax.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                                    [m + s for m, s in zip(means, stds, strict=True)],
                                    color=colors[row], alpha=0.2, lw=0)
            if column != "all":
                ax.set_title(column, fontsize=9)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(columns):]:
            ax.set_visible(False)
        heading = title if layout.spec.title is None else f"{title}: {layout.spec.title}"
        # About 13 characters of a 10-point title fit in an inch: wrap it to the figure.
        fig.suptitle(textwrap.fill(heading + " (mean ± std over seeds)", int(13 * width)), fontsize=10)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        written.append((title, path))
    return written
