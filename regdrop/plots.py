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
    """Plot the drop rate of each schedule against epochs, one panel each, into one PNG."""
    epochs = [step / max(steps_per_epoch, 1) for step in range(total_steps)]
    panels = len(schedules)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels + 1.2, 2.8), dpi=120, sharey=True, squeeze=False)
    for ax, (label, schedule) in zip(axes[0], schedules, strict=True):
        ax.plot(epochs, [peak * f for f in schedule.factors(total_steps)], lw=1.8, color="tab:blue")
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("drop rate")
    axes[0][0].set_ylim(-0.04 * max(peak, 1e-6), peak * 1.08 + 1e-6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
