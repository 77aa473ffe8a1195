"""Where a run's numbers go: ``metrics.jsonl`` and ``metrics.json`` in the run folder, and wandb.

The files are written whatever the logger, one JSON line per record, flushed at once, so
that a killed run keeps every step it logged. wandb runs offline by default (no account,
no network) inside the run folder; ``WANDB_MODE`` in the environment wins over
``logger.mode``. Each Hydra job gets its own wandb run, finished when the job ends, even
when several jobs of a multirun share one process.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regdrop.errors import ConfigError, check_keys

WANDB_MODES = ("offline", "online", "disabled")
WANDB_KEYS = {"name", "mode", "project", "entity", "group", "run_name", "tags"}


class RunTracker:
    """Writes the metrics files and, when configured, a wandb run."""

    def __init__(self, output_dir: Path, cfg: DictConfig) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self.wandb_run = None
        logger = cfg.logger
        if logger.name == "wandb":
            check_keys(logger, "logger", WANDB_KEYS)
            self.wandb_run = _start_wandb(self.output_dir, cfg)
        elif logger.name != "none":
            raise ConfigError("logger", f"unknown logger {logger.name!r}; valid: wandb, none")

    @property
    def run_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def log(self, record: dict[str, Any], step: int) -> None:
        """One record: a line of metrics.jsonl and a wandb log call at ``step``."""
        self._jsonl.write(json.dumps(_clean(record)) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_config_extra(self, values: dict[str, Any]) -> None:
        """Facts found at run time (surgery report, steps per epoch): into the wandb config."""
        if self.wandb_run is not None:
            self.wandb_run.config.update(values, allow_val_change=True)

    def log_image(self, key: str, path: Path, step: int = 0) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, summary: dict[str, Any] | None, exit_code: int = 0) -> None:
        """Write metrics.json (when the run has a summary) and close everything."""
        if summary is not None:
            with open(self.output_dir / "metrics.json", "w") as f:
                json.dump(_clean(summary), f, indent=2)
        self._jsonl.close()
        if self.wandb_run is not None:
            if summary is not None:
                for key, value in summary.items():
                    self.wandb_run.summary[key] = value
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def _start_wandb(output_dir: Path, cfg: DictConfig):
    import wandb

    logger = cfg.logger
    mode = os.environ.get("WANDB_MODE") or logger.mode
    if mode not in WANDB_MODES:
        source = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "logger.mode"
        raise ConfigError(source, f"must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    return wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=logger.group,
        name=logger.run_name,
        tags=list(logger.tags or []),
        config=OmegaConf.to_container(cfg, resolve=True),
        dir=str(output_dir),
        mode=mode,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe values: NaN and infinities become None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
