"""Calibration (Guo et al., ICML 2017): the per-bin sums of top-1 confidence and accuracy,
the expected calibration error and the reliability diagram.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Calibration:
    """Per-bin sums of top-1 confidence and correctness over equal-width bins of (0, 1]."""

    counts: torch.Tensor        # samples per bin
    confidence: torch.Tensor    # sum of top-1 confidences per bin
    correct: torch.Tensor       # number of correct top-1 predictions per bin

    @classmethod
    def empty(cls, bins: int) -> Calibration:
        zeros = torch.zeros(bins, dtype=torch.float64)
        return cls(zeros.clone(), zeros.clone(), zeros.clone())

    @property
    def bins(self) -> int:
        return len(self.counts)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Add samples: their top-1 ``confidence`` in (0, 1] and whether they were ``correct``."""
        confidence = confidence.detach().double().cpu()
        # Bin b holds ((b-1)/n, b/n] (Guo et al.): bucketize against the inner edges.
        edges = torch.linspace(0.0, 1.0, self.bins + 1, dtype=torch.float64)[1:-1]
        index = torch.bucketize(confidence, edges, right=False)
        self.counts.index_add_(0, index, torch.ones_like(confidence))
        self.confidence.index_add_(0, index, confidence)
        self.correct.index_add_(0, index, correct.detach().double().cpu())

    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy - confidence| x bin share."""
        total = self.counts.sum()
        return float((self.correct - self.confidence).abs().sum() / total) if total > 0 else math.nan

    def accuracy_per_bin(self) -> torch.Tensor:
        return self.correct / self.counts.clamp_min(1)

    def confidence_per_bin(self) -> torch.Tensor:
        return self.confidence / self.counts.clamp_min(1)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of ``B x C`` logits against ``labels``: top-1 confidence, ``bins`` equal-width bins."""
    probabilities = logits.float().softmax(-1)
    confidence, predicted = probabilities.max(-1)
    calibration = Calibration.empty(bins)
    calibration.add(confidence, predicted == labels)
    return calibration.ece()


def plot_reliability(curves: Mapping[str, Calibration], path: str | Path) -> Path:
    """A reliability diagram per calibration, side by side, into one PNG (matplotlib Agg)."""
    from regdrop.plots import plt  # sets the Agg backend

    panels = len(curves)
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.4), dpi=120, squeeze=False)
    for ax, (label, calibration) in zip(axes[0], curves.items(), strict=True):
        bins = calibration.bins
        centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
        filled = calibration.counts > 0
        accuracy = calibration.accuracy_per_bin()
        confidence = calibration.confidence_per_bin()
        ax.bar(centres[filled], accuracy[filled], width=1.0 / bins, color="tab:blue",
               edgecolor="white", label="accuracy")
        ax.bar(centres[filled], (confidence - accuracy)[filled], bottom=accuracy[filled],
               width=1.0 / bins, color="tab:red", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
        ax.set_title(f"{label}: ECE {calibration.ece():.4f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
