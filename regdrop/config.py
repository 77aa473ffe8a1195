"""Every check of a run's config, made before any data is read or any model is built.

`validate(cfg)` is the only place that knows the order of the checks: the top level, then
each section through the check half of its builder (``check_data``, ``check_model``,
``check_method``, ``check_schedule``, ``check_optim``, ``check_lr``, ``check_loss``,
``check_trainer``, ``check_logger``), then what only the sections together decide: batch
mixing pairs samples within a batch, so it needs an even batch; the model is built on
PyTorch's ``meta`` device (shapes, no memory, no data) for the data's image size and
classes, and the method is installed into it, so a method the model cannot take, or a
hyper-parameter that does not fit it, is found before anything real happens. Last, the
run's length: a schedule cutoff or warm-up beyond the run, and each method's run-length
rules (`regdrop.methods.method_run_length`: gyro's ``tau`` above the batch).
Doubtful but legal choices (``sigma`` not a multiple of ``tau``) become one-line warnings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from regdrop.data import DataInfo, check_data, data_info
from regdrop.diagnostics import check_diagnostics
from regdrop.errors import ConfigError, check_keys
from regdrop.losses import check_loss, mixes
from regdrop.methods import RunFacts, apply_method, check_method, method_run_length
from regdrop.models import build_model, check_model
from regdrop.optim import check_lr, check_optim
from regdrop.report.table import check_table
from regdrop.runtime import check_seed, check_trainer, world_size_from_env
from regdrop.schedules import DropSchedule, check_schedule, epochs_to_steps, steps_per_epoch
from regdrop.tracking import check_logger

TOP_LEVEL_KEYS = {
    "task_name", "seed", "tags", "optimized_metric",
    "data", "model", "dropout", "schedule", "optim", "lr", "trainer", "logger", "paths",
    "diagnostics", "table", "loss",
}
# Summary keys a sweeper may optimise (`optimized_metric`): what `train` returns.
OPTIMIZABLE = ("best/test_acc", "test/acc", "test/loss", "train/loss")


@dataclass(frozen=True)
class Checked:
    """What validation learnt on the way: the data's shape, and warnings for the run."""

    info: DataInfo
    warnings: list[str] = field(default_factory=list)


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
    check_loss(cfg.get("loss"))
    if mixes(cfg.get("loss")) and cfg.data.batch_size % 2:
        raise ConfigError("data.batch_size", f"{cfg.data.batch_size} is odd: mixup and CutMix pair each "
                          "sample of a batch with another (timm's Mixup), so they need an even batch")
    check_trainer(cfg.trainer)
    check_logger(cfg.logger)
    check_diagnostics(cfg.diagnostics)
    check_table(cfg.get("table"))
    info = data_info(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, info)
    report = apply_method(model, cfg.dropout, seed=cfg.seed)
    return Checked(info, check_run_length(cfg, info, report.options))


def check_run_length(cfg: DictConfig, info: DataInfo, method: dict) -> list[str]:
    """What only the run's length decides; returns warnings for doubtful choices."""
    warnings = []
    batch, accum = cfg.data.batch_size, cfg.trainer.grad_accum
    if not info.num_train:  # ImageNet: the size is known once its folders are listed
        return warnings + method_run_length(cfg.dropout.name, method, RunFacts(batch, None))
    world_size = world_size_from_env()
    per_epoch = steps_per_epoch(info.num_train, batch, accum, world_size)
    if per_epoch < 1:
        raise ConfigError("data.batch_size", f"{info.num_train} training images give no optimizer step per "
                          f"epoch at batch {batch} x grad_accum {accum} x {world_size} process(es)")
    # The run as its epochs define it: trainer.max_steps only stops it early (smoke runs).
    total = per_epoch * cfg.trainer.epochs
    schedule = DropSchedule.from_config(cfg.schedule, per_epoch)
    key = "schedule.warmup_epochs" if schedule.name == "warmup" else "schedule.cutoff_epoch"
    beyond = {"early": schedule.steps > total, "late": schedule.steps >= total, "warmup": schedule.steps > total}
    if beyond.get(schedule.name):
        what = {"early": "the early-dropout ramp would never reach 0", "late": "late dropout would never "
                "switch on", "warmup": "the warm-up would never reach the peak"}[schedule.name]
        limit = "fewer than" if schedule.name == "late" else "at most"
        raise ConfigError(key, f"{cfg.schedule.get(key.split('.')[1])} epochs ({schedule.steps} steps) lies "
                          f"beyond the run's {total} steps ({per_epoch} per epoch): {what}; give {limit} "
                          f"{total / per_epoch:g} epochs")
    if cfg.lr.name == "cosine" and epochs_to_steps(cfg.lr.warmup_epochs, per_epoch) > total:
        raise ConfigError("lr.warmup_epochs", f"{cfg.lr.warmup_epochs} epochs of warm-up exceed the run's "
                          f"{cfg.trainer.epochs} epochs ({total} steps)")
    return warnings + method_run_length(cfg.dropout.name, method, RunFacts(batch, total))
