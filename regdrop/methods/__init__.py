"""The dropout methods: one module per method, each a layer plus an ``apply_<method>``.

`apply_method(model, cfg)` installs the method the config ``dropout`` section names; the
section's keys (besides ``name``) are exactly the keyword arguments of that method's
``apply_<method>`` function, so a typo is an error, not a silently ignored key.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping

from torch import nn

from regdrop.errors import ConfigError
from regdrop.methods.base import (
    DropModule,
    DropSite,
    MethodNotApplicable,
    SurgeryReport,
    drop_modules,
    find_sites,
    set_rate_factor,
)

# method name -> (module, apply function, the key that holds its peak rate)
METHODS: dict[str, tuple[str, str, str]] = {
    "standard": ("standard", "apply_standard_dropout", "p"),
    "spatial": ("spatial", "apply_spatial_dropout", "p"),
    "dropconnect": ("dropconnect", "apply_dropconnect", "p"),
    "gyro": ("gyro", "apply_gyro_dropout", "p"),
    "multisample": ("multisample", "apply_multisample_dropout", "p"),
    "stochastic_depth": ("stochastic_depth", "apply_stochastic_depth", "drop_rate"),
}
VALID = ("none", *METHODS)

__all__ = [
    "METHODS",
    "DropModule",
    "DropSite",
    "MethodNotApplicable",
    "SurgeryReport",
    "apply_method",
    "begin_step",
    "drop_modules",
    "find_sites",
    "method_function",
    "peak_rate",
    "set_rate_factor",
]


def method_function(name: str) -> Callable[..., SurgeryReport]:
    """The ``apply_<method>`` function of method ``name``."""
    if name not in METHODS:
        raise ConfigError("dropout.name", f"unknown method {name!r}; valid: {', '.join(VALID)}")
    module, function, _ = METHODS[name]
    return getattr(importlib.import_module(f"regdrop.methods.{module}"), function)


def peak_rate(cfg: Mapping) -> float:
    """The peak drop rate the config ``dropout`` section sets (0 for ``none``)."""
    name = cfg["name"]
    if name == "none":
        return 0.0
    if name not in METHODS:
        raise ConfigError("dropout.name", f"unknown method {name!r}; valid: {', '.join(VALID)}")
    if name == "multisample" and cfg.get("rates"):
        return float(max(cfg["rates"]))  # per-copy rates: the largest is the peak
    return float(cfg[METHODS[name][2]])


def apply_method(model: nn.Module, cfg: Mapping) -> SurgeryReport:
    """Install the method of the config ``dropout`` section into ``model`` (in place).

    Bad keys and values become a `ConfigError` naming the ``dropout.<key>`` at fault.
    """
    options = dict(cfg)
    name = options.pop("name")
    if name == "none":
        if options:
            raise ConfigError(f"dropout.{next(iter(options))}", "method 'none' takes no options")
        return SurgeryReport("none")
    apply = method_function(name)
    valid = [p for p in inspect.signature(apply).parameters if p != "model"]
    for key in options:
        if key not in valid:
            raise ConfigError(f"dropout.{key}", f"not an option of method {name!r}; valid: {', '.join(valid)}")
    options = {k: list(v) if isinstance(v, list | tuple) or _is_listconfig(v) else v for k, v in options.items()}
    try:
        return apply(model, **options)
    except MethodNotApplicable as err:
        raise ConfigError(f"dropout={name}", str(err)) from None
    except (ValueError, TypeError) as err:
        message = str(err)
        first = message.split(" ", 1)[0].rstrip(":")
        key = f"dropout.{first}" if first in valid else f"dropout={name}"
        raise ConfigError(key, message) from None


def begin_step(model: nn.Module, step: int) -> None:
    """Tell every drop layer of ``model`` that optimizer step ``step`` is starting."""
    for module in drop_modules(model):
        module.begin_step(step)


def _is_listconfig(value) -> bool:
    return type(value).__name__ == "ListConfig"
