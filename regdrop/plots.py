"""Plots regdrop writes itself (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from regdrop.schedules import DropSchedule  # noqa: E402


def plot_schedules(
    schedules: Sequence[tuple[str, DropSchedule]],
    peak: float,
    total_steps: int,
    steps_per_epoch: int,
    path: str | Path,
    title: str = "Drop-rate schedule",
) -> Path:
    """Plot the drop rate of each schedule against epochs into one PNG; returns its path."""
    epochs = [step / max(steps_per_epoch, 1) for step in range(total_steps)]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    for label, schedule in schedules:
        ax.plot(epochs, [peak * f for f in schedule.factors(total_steps)], label=label, lw=1.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("drop rate")
    ax.set_ylim(-0.02 * max(peak, 1e-6), peak * 1.08 + 1e-6)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(schedules) > 1:
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
