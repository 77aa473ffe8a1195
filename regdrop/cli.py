"""What `train.py`'s Hydra entry point runs: `regdrop.train.train`, with errors reported plainly.

A bad config value stops the run with one paragraph naming the key and what is valid (exit
status 2), never a traceback. In a multirun the failing job is marked failed and the other
jobs go on; when the sweep ends Hydra reports the failed job (with its traceback) and exits 1.
"""

from __future__ import annotations

import sys
import textwrap

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from regdrop.errors import ConfigError


def run(cfg: DictConfig) -> float | None:
    """Train ``cfg``; return the metric sweepers optimise (``optimized_metric``)."""
    from regdrop.train import train  # imported here so `--help` and `--cfg` stay fast

    try:
        metrics = train(cfg)
    except ConfigError as err:
        message = textwrap.fill(f"regdrop: error in {err}", width=100)
        print(message, file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(2)
    return metrics.get(cfg.optimized_metric)
