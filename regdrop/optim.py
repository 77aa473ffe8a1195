"""Optimizers (``optim`` group) and per-step learning-rate schedules (``lr`` group)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from regdrop.errors import ConfigError, check_keys, check_number
from regdrop.schedules import epochs_to_steps

_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr", "momentum", "nesterov", "weight_decay"}),
    "adamw": (torch.optim.AdamW, {"lr", "betas", "weight_decay"}),
    "rmsprop": (torch.optim.RMSprop, {"lr", "alpha", "momentum", "eps", "weight_decay"}),
}
_LR_KEYS = {
    "cosine": {"warmup_epochs", "warmup_start_factor", "min_factor"},
    "multistep": {"milestones", "gamma"},
    "none": set(),
}


def _options(cfg, group: str, valid: set[str]) -> dict:
    check_keys(cfg, group, valid | {"name"})
    options = dict(cfg)
    options.pop("name")
    return {k: tuple(v) if k == "betas" else v for k, v in options.items()}


def check_optim(cfg) -> None:
    """Check the config ``optim`` section: name, keys and values."""
    if cfg.name not in _OPTIMIZERS:
        raise ConfigError("optim.name", f"unknown optimizer {cfg.name!r}; valid: {', '.join(_OPTIMIZERS)}")
    _, valid = _OPTIMIZERS[cfg.name]
    options = _options(cfg, "optim", valid)
    for key, value in options.items():
        if key == "betas":
            if len(value) != 2:
                raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {list(value)}")
            for beta in value:
                check_number(beta, "optim.betas", minimum=0)
        elif key == "lr":
            check_number(value, "optim.lr", above=0)
        elif key == "nesterov":
            if not isinstance(value, bool):
                raise ConfigError("optim.nesterov", f"must be true or false, got {value!r}")
        else:
            check_number(value, f"optim.{key}", minimum=0)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of the config ``optim`` section; no weight decay on norms and biases."""
    check_optim(cfg)
    cls, valid = _OPTIMIZERS[cfg.name]
    options = _options(cfg, "optim", valid)
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return cls(groups, **options)


def check_lr(cfg) -> None:
    """Check the config ``lr`` section: name, keys and values."""
    if cfg.name not in _LR_KEYS:
        raise ConfigError("lr.name", f"unknown lr schedule {cfg.name!r}; valid: {', '.join(_LR_KEYS)}")
    options = _options(cfg, "lr", _LR_KEYS[cfg.name])
    for key, value in options.items():
        for item in value if key == "milestones" else [value]:
            check_number(item, f"lr.{key}", minimum=0)


def build_lr_schedule(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int) -> LambdaLR:
    """A per-optimizer-step learning-rate schedule (a multiplier of the base lr); epochs
    become steps by `epochs_to_steps`, the drop-rate schedules' rule."""
    check_lr(cfg)
    options = _options(cfg, "lr", _LR_KEYS[cfg.name])
    if cfg.name == "none":
        return LambdaLR(optimizer, lambda step: 1.0)
    if cfg.name == "multistep":
        milestones = sorted(epochs_to_steps(e, steps_per_epoch) for e in options.get("milestones", []))
        gamma = options.get("gamma", 0.1)
        return LambdaLR(optimizer, lambda step: gamma ** sum(step >= m for m in milestones))
    warmup = epochs_to_steps(options.get("warmup_epochs", 0), steps_per_epoch)
    start = options.get("warmup_start_factor", 0.0)
    floor = options.get("min_factor", 0.0)

    def cosine(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, cosine)
