"""The dropout methods: one module per method, each declaring itself once as a `Method`.

A method module holds its layer(s), its options dataclass (the keys and defaults of
``conf/dropout/<method>.yaml``, whose schema it is), its ``check`` and ``apply_<method>``,
and its optional hooks (`regdrop.methods.method`). `REGISTERED` is the one list of
methods: the config check, the trainer, the tests, the benchmark and the docs' method table
all read `REGISTRY`, built from it by explicit import. Importing this package registers the
schemas with Hydra's ConfigStore, so any code that composes the config tree imports it first.

The training loop reaches the methods only through this package's functions:

* `check_method` (before anything is built) and `apply_method` (the surgery);
* `method_run_length` once the run's length is known (the methods' run-length rules);
* `setup_run` once with the run's length, `begin_step` before every optimizer step with
  the schedule's rate factor;
* `forward_loss` (a training micro-batch's forward pass(es) and loss: R-Drop's two passes),
  `training_loss` and `predictions`, which know what a method does to the logits
  (multi-sample dropout trains on ``M x B x C`` copies);
* `ensemble_members` (an MC-dropout ensemble's members: gyro's subnetworks);
* `peak_rate`, read from the installed layers.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
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
from regdrop.methods.method import Loss, Method, RunFacts, register_schemas

# The registered methods, one module each: adding a method is adding its line here.
REGISTERED = (
    "standard",
    "spatial",
    "dropconnect",
    "gyro",
    "multisample",
    "stochastic_depth",
    "dropblock",
    "rdrop",
)
REGISTRY: dict[str, Method] = {
    name: importlib.import_module(f"regdrop.methods.{name}").METHOD for name in REGISTERED
}
VALID = ("none", *REGISTRY)
register_schemas(REGISTRY)

__all__ = [
    "REGISTRY",
    "VALID",
    "DropModule",
    "DropSite",
    "MethodAlreadyApplied",
    "MethodNotApplicable",
    "RunFacts",
    "SurgeryReport",
    "apply_method",
    "begin_step",
    "check_method",
    "method_run_length",
    "drop_modules",
    "ensemble_members",
    "find_sites",
    "forward_loss",
    "has_unused_parameters",
    "method",
    "peak_rate",
    "predictions",
    "set_rate_factor",
    "setup_run",
    "training_loss",
]


def method(name: str) -> Method:
    """The registered method called ``name``; a `ConfigError` naming ``dropout.name`` if none."""
    if name not in REGISTRY:
        raise ConfigError("dropout.name", f"unknown method {name!r}; valid: {', '.join(VALID)}")
    return REGISTRY[name]


def _plain(cfg: Mapping) -> dict[str, Any]:
    """The ``dropout`` section as plain Python values (lists, not ListConfig)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return {k: OmegaConf.to_container(v) if isinstance(v, DictConfig | ListConfig) else v for k, v in cfg.items()}


def _rename(declared: Method, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with each deprecated key moved to its new name (one warning each). A null
    alias is "not given", unless the new key is absent too (a hand-written dict)."""
    for old, new in declared.aliases.items():
        if old not in options:
            continue
        value = options.pop(old)
        if value is not None or new not in options:
            if value is not None:
                warnings.warn(f"dropout.{old} is deprecated: it is {declared.name}'s {new}, the name "
                              f"every method gives its rate; use dropout.{new}", FutureWarning, stacklevel=3)
            options[new] = value
    return options


def _options(cfg: Mapping) -> tuple[str, dict]:
    """The method name and its options, typed by the method's options dataclass: every key
    given is an option, every value has the option's type (OmegaConf converts ``1`` to
    ``1.0`` for a float, and refuses ``"abc"``)."""
    options = _plain(cfg)
    name = options.pop("name")
    if name == "none":
        if options:
            raise ConfigError(f"dropout.{next(iter(options))}", "method 'none' takes no options")
        return name, {}
    declared = method(name)
    options = _rename(declared, options)
    valid = declared.option_keys()
    for key in options:
        if key not in valid:
            shown = [k for k in valid if k not in declared.aliases]
            raise ConfigError(f"dropout.{key}", f"not an option of method {name!r}; valid: {', '.join(shown)}")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(declared.options), options)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "name"
        message = str(err).splitlines()[0]
        raise ConfigError(f"dropout.{key}", f"{message} (method {name!r})") from None
    return name, {key: value for key, value in OmegaConf.to_container(typed).items() if key not in declared.aliases}


def check_method(cfg: Mapping) -> None:
    """Check the config ``dropout`` section without a model: the name, that every key is an
    option of the method and has its type, and each value (the method's ``check``). A null
    option that a model may recommend is left to `apply_method`, which knows the model."""
    _checked(cfg)


def _checked(cfg: Mapping) -> tuple[str, dict]:
    """`check_method`, returning the method's name and typed options."""
    name, options = _options(cfg)
    if name == "none":
        return name, options
    declared = REGISTRY[name]
    defaults = declared.defaults()
    for key, value in options.items():
        if value is None and key != "seed" and defaults.get(key) is not None and key not in declared.recommendable:
            raise ConfigError(f"dropout.{key}", f"must be set for method {name!r} (got null)")
    stand_in = {k: (defaults[k] if v is None and k in declared.recommendable else v) for k, v in options.items()}
    with _as_config_error(name, declared.option_keys()):
        declared.check(declared.options(**stand_in))
    return name, options


def apply_method(model: nn.Module, cfg: Mapping, *, seed: int = 0) -> SurgeryReport:
    """Install the method of the config ``dropout`` section into ``model`` (in place).

    An option left null takes the model's recommendation for the method when it has one
    (``regdrop_method_defaults``: gyro's (sigma, tau) on the ResNets, the early-dropout
    rates on Liu et al.'s models), and a null ``seed``
    follows the run's ``seed``, so that every random stream of a run changes with it. The
    returned report holds the options used and where the unset ones came from. Bad keys
    and values become a `ConfigError` naming the ``dropout.<key>`` at fault. The model
    remembers its method (``regdrop_method``, ``regdrop_options``) for `forward_loss`.
    """
    name, options = _checked(cfg)
    if name == "none":
        return SurgeryReport("none")
    declared = REGISTRY[name]
    notes = []
    recommended = _rename(declared, method_defaults(model, name))
    for key, value in recommended.items():
        if options.get(key, 0) is None:
            options[key] = value
            notes.append(f"{key}={value}: {type(model).__name__}'s recommendation")
    if options.get("seed", 0) is None:
        options["seed"] = seed
        notes.append("seed follows the run seed")
    defaults = declared.defaults()
    for key, value in options.items():
        if value is None and defaults.get(key) is not None:
            raise ConfigError(f"dropout.{key}", f"is null, which takes the model's recommendation, and "
                              f"{type(model).__name__} has none for method {name!r}; set a value")
    with _as_config_error(name, declared.option_keys()):
        report = declared.apply(model, **options)
    model.regdrop_method, model.regdrop_options = name, dict(options)
    report.options = {**options, **report.options}
    report.notes = notes + report.notes
    return report


def method_run_length(name: str, options: Mapping[str, Any], facts: RunFacts) -> list[str]:
    """The run-length rules of method ``name`` (with the options its surgery used);
    returns warnings for doubtful choices, raises a `ConfigError` for impossible ones."""
    declared = REGISTRY.get(name)
    if declared is None or declared.run_length is None:
        return []
    with _as_config_error(name, declared.option_keys()):
        return declared.run_length(options, facts)


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


def installed(net: nn.Module) -> tuple[str | None, dict]:
    """The method `apply_method` installed in ``net`` (seen through DDP and ``torch.compile``
    wrappers) and its options; ``(None, {})`` when none was."""
    while not hasattr(net, "regdrop_method"):
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None, {}
        net = inner
    return net.regdrop_method, net.regdrop_options


def forward_loss(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: Loss
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training micro-batch: ``(logits, loss)``. ``loss(logits, targets)`` is the loss of
    one forward pass; a method with a ``forward_loss`` hook (R-Drop's two passes) decides
    how the passes combine, else it is ``loss(net(inputs), targets)``."""
    name, options = installed(net)
    hook = REGISTRY[name].forward_loss if name in REGISTRY else None
    if hook is not None:
        return hook(net, inputs, targets, loss, options)
    logits = net(inputs)
    return logits, loss(logits, targets)


def training_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Loss = F.cross_entropy,
) -> torch.Tensor:
    """The training loss of a forward pass: ``loss_fn`` on ``B x C`` logits; logits of
    another shape go to the method whose ``training_loss`` hook made them (multi-sample)."""
    if logits.ndim != 2:
        for declared in REGISTRY.values():
            if declared.training_loss is not None:
                return declared.training_loss(logits, targets, loss_fn)
    return loss_fn(logits, targets)


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """``B x C`` logits to judge predictions by (each method's ``predictions`` hook: the
    multi-sample copies averaged)."""
    for declared in REGISTRY.values():
        if declared.predictions is not None:
            logits = declared.predictions(logits)
    return logits


def ensemble_members(model: nn.Module, name: str, which: str) -> list:
    """The members of an MC-dropout ensemble of ``model`` by method ``name``'s ``ensemble``
    hook (gyro's subnetworks: ``which`` is ``tau`` or ``sigma``)."""
    hook = method(name).ensemble
    if hook is None:
        raise ValueError(f"method {name!r} declares no ensemble members")
    return hook(model, which)


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

