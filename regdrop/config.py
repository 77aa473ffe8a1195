"""Every check of a run's config, made before any data is read or any model is built.

`validate(cfg)` is the only place that knows the order of the checks: the top level, then
each section through the check half of its builder (``check_data``, ``check_model``,
``check_method``, ``check_schedule``, ``check_optim``, ``check_lr``, ``check_trainer``,
``check_logger``), then what only the sections together decide: the model is built on
PyTorch's ``meta`` device (shapes, no memory, no data) for the data's image size and
classes, and the method is installed into it, so a method the model cannot take, or a
hyper-parameter that does not fit it, is found before anything real happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from regdrop.data import DataInfo, check_data, data_info
from regdrop.diagnostics import check_diagnostics
from regdrop.errors import ConfigError, check_keys
from regdrop.methods import apply_method, check_method
from regdrop.models import build_model, check_model
from regdrop.optim import check_lr, check_optim
from regdrop.runtime import check_seed, check_trainer
from regdrop.schedules import check_schedule
from regdrop.tracking import check_logger

TOP_LEVEL_KEYS = {
    "task_name", "seed", "tags", "optimized_metric",
    "data", "model", "dropout", "schedule", "optim", "lr", "trainer", "logger", "paths",
    "diagnostics",
}
# Summary keys a sweeper may optimise (`optimized_metric`): what `train` returns.
OPTIMIZABLE = ("best/test_acc", "test/acc", "test/loss", "train/loss")


@dataclass(frozen=True)
class Checked:
    """What validation learnt on the way: the data's shape."""

    info: DataInfo


def validate(cfg: DictConfig) -> Checked:
    """Check every section of ``cfg``; raise the first `ConfigError` found."""
    check_keys(cfg, None, TOP_LEVEL_KEYS)
    check_seed(cfg.seed)
    if cfg.optimized_metric not in OPTIMIZABLE:
        raise ConfigError("optimized_metric", f"{cfg.optimized_metric!r} is not a metric a run returns; "
                          f"valid: {', '.join(OPTIMIZABLE)}")
    check_data(cfg.data)
    check_model(cfg.model)
    check_method(cfg.dropout)
    check_schedule(cfg.schedule)
    check_optim(cfg.optim)
    check_lr(cfg.lr)
    check_trainer(cfg.trainer)
    check_logger(cfg.logger)
    check_diagnostics(cfg.diagnostics)
    info = data_info(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, info)
    apply_method(model, cfg.dropout, seed=cfg.seed)
    return Checked(info)
