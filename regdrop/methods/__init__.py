"""The dropout methods: one module per method, each a layer plus an ``apply_<method>``.

Every method module has the same three public pieces: its layer(s), ``apply_<method>(model,
...)`` (the surgery) and ``check_options(...)`` (the same keyword arguments, checked without
a model). The config ``dropout`` section's keys (besides ``name``) are exactly those keyword
arguments, so a typo is an error, not a silently ignored key.

The training loop reaches the methods only through this package's functions:

* `check_method` (before anything is built) and `apply_method` (the surgery);
* `setup_run` once with the run's length, `begin_step` before every optimizer step with
  the schedule's rate factor;
* `training_loss` and `predictions`, which know what a method does to the logits
  (multi-sample dropout trains on ``M x B x C`` copies);
* `peak_rate`, read from the installed layers.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from regdrop.errors import ConfigError
from regdrop.methods.base import (
    DropModule,
    DropSite,
    MethodAlreadyApplied,
    MethodNotApplicable,
    SurgeryReport,
    drop_modules,
    find_sites,
    method_defaults,
    set_rate_factor,
)

# method name -> (module, apply function)
METHODS: dict[str, tuple[str, str]] = {
    "standard": ("standard", "apply_standard_dropout"),
    "spatial": ("spatial", "apply_spatial_dropout"),
    "dropconnect": ("dropconnect", "apply_dropconnect"),
    "gyro": ("gyro", "apply_gyro_dropout"),
    "multisample": ("multisample", "apply_multisample_dropout"),
    "stochastic_depth": ("stochastic_depth", "apply_stochastic_depth"),
}
VALID = ("none", *METHODS)
# Arguments the trainer sets from the run itself: not config keys.
RUN_ARGUMENTS = {"model", "total_steps"}
# Options a model may recommend (``regdrop_method_defaults``) though the method has a default
# of its own: null in the config asks for the model's value (Liu et al.'s rates). Options
# whose default is None (gyro's sigma, tau) may always be null.
RECOMMENDABLE = {"standard": {"p"}, "stochastic_depth": {"drop_rate"}}

__all__ = [
    "METHODS",
    "DropModule",
    "DropSite",
    "MethodAlreadyApplied",
    "MethodNotApplicable",
    "SurgeryReport",
    "apply_method",
    "begin_step",
    "check_method",
    "drop_modules",
    "find_sites",
    "has_unused_parameters",
    "method_function",
    "peak_rate",
    "predictions",
    "set_rate_factor",
    "setup_run",
    "training_loss",
]


def _module(name: str) -> ModuleType:
    if name not in METHODS:
        raise ConfigError("dropout.name", f"unknown method {name!r}; valid: {', '.join(VALID)}")
    return importlib.import_module(f"regdrop.methods.{METHODS[name][0]}")


def method_function(name: str) -> Callable[..., SurgeryReport]:
    """The ``apply_<method>`` function of method ``name``."""
    return getattr(_module(name), METHODS[name][1])


def config_keys(name: str) -> list[str]:
    """The ``dropout.<key>`` options of method ``name``: its apply function's arguments."""
    parameters = inspect.signature(method_function(name)).parameters
    return [key for key in parameters if key not in RUN_ARGUMENTS]


def _options(cfg: Mapping) -> tuple[str, dict]:
    """The method name and its options as plain Python values (lists, not ListConfig)."""
    options = {k: list(v) if _is_sequence(v) else v for k, v in dict(cfg).items()}
    return options.pop("name"), options


def check_method(cfg: Mapping) -> None:
    """Check the config ``dropout`` section without a model: the name, that every key is an
    option of the method, and each value (the method's ``check_options``). A null option
    that a model may recommend (`RECOMMENDABLE`) is left to `apply_method`, which knows the
    model."""
    name, options = _options(cfg)
    if name == "none":
        if options:
            raise ConfigError(f"dropout.{next(iter(options))}", "method 'none' takes no options")
        return
    valid = config_keys(name)
    for key in options:
        if key not in valid:
            raise ConfigError(f"dropout.{key}", f"not an option of method {name!r}; valid: {', '.join(valid)}")
    defaults = inspect.signature(method_function(name)).parameters
    for key, value in options.items():
        if (value is None and key != "seed" and defaults[key].default is not None
                and key not in RECOMMENDABLE.get(name, ())):
            raise ConfigError(f"dropout.{key}", f"must be set for method {name!r} (got null)")
    with _as_config_error(name, valid):
        _module(name).check_options(**{k: v for k, v in options.items() if v is not None})


def apply_method(model: nn.Module, cfg: Mapping, *, seed: int = 0) -> SurgeryReport:
    """Install the method of the config ``dropout`` section into ``model`` (in place).

    An option left null takes the model's recommendation for the method when it has one
    (``regdrop_method_defaults``: gyro's (sigma, tau) on the ResNets, the early-dropout
    rates on Liu et al.'s models), and a null ``seed``
    follows the run's ``seed``, so that every random stream of a run changes with it. The
    returned report holds the options used and where the unset ones came from. Bad keys
    and values become a `ConfigError` naming the ``dropout.<key>`` at fault.
    """
    check_method(cfg)
    name, options = _options(cfg)
    if name == "none":
        return SurgeryReport("none")
    notes = []
    recommended = method_defaults(model, name)
    for key, value in recommended.items():
        if options.get(key, 0) is None:
            options[key] = value
            notes.append(f"{key}={value}: {type(model).__name__}'s recommendation")
    if options.get("seed", 0) is None:
        options["seed"] = seed
        notes.append("seed follows the run seed")
    parameters = inspect.signature(method_function(name)).parameters
    for key, value in options.items():
        if value is None and parameters[key].default is not None:
            raise ConfigError(f"dropout.{key}", f"is null, which takes the model's recommendation, and "
                              f"{type(model).__name__} has none for method {name!r}; set a value")
    with _as_config_error(name, config_keys(name)):
        report = method_function(name)(model, **options)
    report.options = {**options, **report.options}
    report.notes = notes + report.notes
    return report


def setup_run(model: nn.Module, total_steps: int, rank: int = 0, world_size: int = 1) -> None:
    """Tell every drop layer of ``model`` the run's length in optimizer steps (gyro's
    periods) and this process's place among the data-parallel ranks (gyro's sub-batches
    are cut from the global batch)."""
    for module in drop_modules(model):
        module.setup_run(total_steps, rank, world_size)


def begin_step(model: nn.Module, step: int, factor: float = 1.0) -> None:
    """Start optimizer step ``step`` (from 0) with the rate in force ``factor * peak``."""
    for module in drop_modules(model):
        module.set_rate_factor(factor)
        module.begin_step(step)


def has_unused_parameters(model: nn.Module) -> bool:
    """Whether a training step may leave parameters without a gradient (block-mode
    stochastic depth skips whole branches), which data parallelism must be told of."""
    return any(getattr(module, "skips_computation", False) for module in drop_modules(model))


def peak_rate(model: nn.Module) -> float:
    """The largest peak rate of the installed drop layers (0 when there are none)."""
    return max((module.peak for module in drop_modules(model)), default=0.0)


def training_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """The training loss of a forward pass: ``loss_fn``, or the mean over multi-sample copies."""
    from regdrop.methods.multisample import multisample_loss

    return multisample_loss(logits, targets, loss_fn)


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """``B x C`` logits to judge predictions by (multi-sample copies averaged)."""
    from regdrop.methods.multisample import collapse_copies

    return collapse_copies(logits)


class _as_config_error:
    """Turn a method's `ValueError` into a `ConfigError` naming ``dropout.<option>``."""

    def __init__(self, name: str, valid: list[str]) -> None:
        self.name, self.valid = name, valid

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, traceback) -> bool:
        if err is None or isinstance(err, ConfigError):
            return False
        if isinstance(err, MethodNotApplicable | MethodAlreadyApplied):
            raise ConfigError(f"dropout={self.name}", str(err)) from None
        if isinstance(err, ValueError | TypeError):
            message = str(err)
            first = message.split(" ", 1)[0].rstrip(":")
            key = f"dropout.{first}" if first in self.valid else f"dropout={self.name}"
            raise ConfigError(key, message) from None
        return False


def _is_sequence(value) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "ListConfig"
