"""Optimizers (``optim`` group) and per-step learning-rate schedules (``lr`` group).

Two rules of the papers' recipes live here:

* The LR scaling rule (Goyal et al. 2017; the early-dropout code's "lr 4e-3 at batch
  4096"): with ``optim.reference_batch`` set, ``optim.lr`` is the rate at that global
  batch and the run uses ``lr * global_batch / reference_batch``, where the global batch
  is ``data.batch_size x trainer.grad_accum x`` the number of processes. So a table
  launched on 1 GPU or on 8 trains the same recipe. Null: ``optim.lr`` as given.
* No weight decay on norms, biases (every parameter of one dimension) and the parameters
  a timm model lists in its ``no_weight_decay()`` (ViT's position embedding and class
  token, Swin's relative position bias tables): the parameter groups of the early-dropout
  code (``get_parameter_groups`` with the model's ``no_weight_decay`` skip list), built by
  timm's ``param_groups_weight_decay``.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from regdrop.errors import ConfigError, check_keys, check_number
from regdrop.schedules import epochs_to_steps

_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr", "momentum", "nesterov", "weight_decay"}),
    "adamw": (torch.optim.AdamW, {"lr", "betas", "weight_decay"}),
    "rmsprop": (torch.optim.RMSprop, {"lr", "alpha", "momentum", "eps", "weight_decay"}),
}
# Keys of every optimizer that are regdrop's, not the torch optimizer's.
_OWN_KEYS = {"reference_batch"}
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


# The keys that are a decay or momentum factor of a running average: in [0, 1). A value of
# 1 or more (``optim.momentum=9`` for 0.9) makes the average grow without bound, and torch
# accepts it without a word.
_FRACTIONS = {
    "momentum": "the momentum factor, 0.9 is usual",
    "alpha": "RMSProp's squared-gradient decay (TensorFlow's decay), 0.9 or 0.99 is usual",
}


def check_fraction(value, key: str, what: str) -> None:
    """Raise `ConfigError` naming ``key`` unless ``value`` is a number in [0, 1)."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value < 1
    if not ok:
        raise ConfigError(key, f"must be a number in [0, 1) ({what}), got {value!r}")


def check_optim(cfg) -> None:
    """Check the config ``optim`` section: name, keys and values, each against its valid
    range, so that torch never trains with a value it would take silently (momentum 9)."""
    if cfg.name not in _OPTIMIZERS:
        raise ConfigError("optim.name", f"unknown optimizer {cfg.name!r}; valid: {', '.join(_OPTIMIZERS)}")
    _, valid = _OPTIMIZERS[cfg.name]
    if "betas" in cfg:
        betas = cfg.betas
        # A scalar or a string here would be unpacked (or fail) as a sequence further on.
        pair = not isinstance(betas, str) and hasattr(betas, "__len__") and len(betas) == 2
        if not pair or not all(not isinstance(b, bool) and isinstance(b, int | float) and 0 <= b < 1
                               for b in betas):
            shown = list(betas) if pair else betas
            raise ConfigError("optim.betas", f"must be a pair [beta1, beta2] of numbers in [0, 1) (the decays "
                              f"of Adam's two averages, [0.9, 0.999] is usual), got {shown!r}")
    options = _options(cfg, "optim", valid | _OWN_KEYS)
    for key, value in options.items():
        if key == "reference_batch":
            check_number(value, "optim.reference_batch", integer=True, minimum=1, optional=True)
        elif key == "betas":
            pass  # checked above, before `_options` unpacks it
        elif key in _FRACTIONS:
            check_fraction(value, f"optim.{key}", _FRACTIONS[key])
        elif key == "lr":
            check_number(value, "optim.lr", above=0)
        elif key == "eps":
            check_number(value, "optim.eps", above=0)
        elif key == "nesterov":
            if not isinstance(value, bool):
                raise ConfigError("optim.nesterov", f"must be true or false, got {value!r}")
        else:
            check_number(value, f"optim.{key}", minimum=0)
    if options.get("nesterov") and not options.get("momentum"):
        raise ConfigError("optim.nesterov", "Nesterov momentum needs a momentum: set optim.momentum in "
                          "(0, 1) or optim.nesterov=false")


def scaled_lr(cfg, global_batch: int | None) -> float:
    """The learning rate a run uses: ``optim.lr`` scaled linearly from
    ``optim.reference_batch`` to ``global_batch`` (unscaled without either)."""
    reference = cfg.get("reference_batch")
    if reference is None or global_batch is None:
        return cfg.lr
    return cfg.lr * global_batch / reference


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's `param_groups_weight_decay` with the model's own ``no_weight_decay()`` list:
    no decay on one-dimensional parameters (norms, biases) and the listed ones. The group
    with decay comes first, as in the checkpoints regdrop wrote before it used timm's
    function, so that their optimizer state still loads (a weight decay of 0 makes one
    group)."""
    listed = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else ()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=listed)
    return sorted(groups, key=lambda group: group["weight_decay"] == 0.0)


def build_optimizer(cfg, model: nn.Module, global_batch: int | None = None) -> torch.optim.Optimizer:
    """The optimizer of the config ``optim`` section at the scaled learning rate
    (`scaled_lr`), with `parameter_groups`."""
    check_optim(cfg)
    cls, valid = _OPTIMIZERS[cfg.name]
    options = _options(cfg, "optim", valid | _OWN_KEYS)
    options.pop("reference_batch", None)
    options["lr"] = scaled_lr(cfg, global_batch)
    return cls(parameter_groups(model, options.get("weight_decay", 0.0)), **options)


def describe_optimizer(cfg, global_batch: int, model: nn.Module | None = None) -> str:
    """One line for the run's header: the optimizer, the learning rate it uses and where
    that rate comes from, the weight decay and what it spares."""
    lr = scaled_lr(cfg, global_batch)
    reference = cfg.get("reference_batch")
    source = (f" (optim.lr {cfg.lr:g} at reference batch {reference}, scaled to global batch {global_batch})"
              if reference is not None else "")
    spared = "norms and biases"
    if model is not None and callable(getattr(model, "no_weight_decay", None)):
        params = {name for name, _ in model.named_parameters()}
        leaves = sorted({n.rsplit(".", 1)[-1] for n in model.no_weight_decay() if n in params})
        spared += "".join(f", {n}" for n in leaves)
    decay = cfg.get("weight_decay", 0.0)
    return f"{cfg.name} lr {lr:g}{source}, weight decay {decay:g} (none on {spared})"


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
