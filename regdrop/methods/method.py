"""A dropout method as one declared unit: its options, its check, its surgery and its hooks.

Each method module ends with one `Method` declaration (``METHOD = Method(...)``). Its
``options`` dataclass is the only place the method's options are written down: the fields and
their defaults are the keys of ``conf/dropout/<method>.yaml``, whose defaults list starts with
``<method>_schema``, the same dataclass registered with Hydra's ConfigStore
(`register_schemas`). OmegaConf therefore checks every key and type of a composed config, and
a key the dataclass lacks, or a default the YAML changes, fails the contract test.

The optional hooks hold what used to be special cases of one method in shared code:

* ``run_length(options, facts)``: checks that only the run's length and batch decide (gyro's
  ``tau`` against the batch, its periods against the run); returns warnings.
* ``ensemble(model, which)``: the members of an MC-dropout ensemble (gyro's subnetworks).
* ``forward_loss(net, inputs, targets, loss, options)``: the forward pass(es) and the loss of
  one training micro-batch, returning ``(logits, loss)`` (R-Drop's two passes); it receives
  the network and the batch, and ``loss(logits, targets)``, the loss of one pass.
* ``training_loss(logits, targets, loss_fn)`` and ``predictions(logits)``: the loss of, and
  ``B x C`` logits from, logits of another shape (multi-sample's ``M x B x C`` copies).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regdrop.methods.base import SurgeryReport

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RunFacts:
    """What the run's length rules of a method may read: the per-process batch and the
    run's optimizer steps (None while the data set's size is unknown: ImageNet folders)."""

    batch_size: int
    total_steps: int | None


@dataclass(frozen=True)
class Method:
    """One dropout method: its name, options, check, surgery and optional hooks.

    ``apply(model, **options)`` installs it; ``check(**options)`` raises a `ValueError`
    whose message starts with the option at fault, without a model. ``recommendable``
    names the options a model may recommend (``regdrop_method_defaults``): null in the
    config asks for the model's value. ``aliases`` maps a deprecated key to its new name.
    ``example_model`` names a small built-in model (``conf/model/<name>.yaml``) the method
    installs in: the tests (contract, exact resume, learning) and the benchmark run every
    registered method on it, so a new method is covered without editing them.
    """

    name: str
    options: type
    apply: Callable[..., SurgeryReport]
    check: Callable[..., Any]
    recommendable: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)
    example_model: str = "lenet"
    run_length: Callable[[Mapping[str, Any], RunFacts], list[str]] | None = None
    ensemble: Callable[[nn.Module, str], list] | None = None
    forward_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, Loss, dict],
                           tuple[torch.Tensor, torch.Tensor]] | None = None
    training_loss: Callable[[torch.Tensor, torch.Tensor, Loss], torch.Tensor] | None = None
    predictions: Callable[[torch.Tensor], torch.Tensor] | None = None

    def option_keys(self) -> list[str]:
        """The ``dropout.<key>`` options, in declaration order."""
        return [f.name for f in dataclasses.fields(self.options)]

    def defaults(self) -> dict[str, Any]:
        """Each option's default, as the config file must give it."""
        return dataclasses.asdict(self.options())

    def schema(self) -> type:
        """The config node of ``conf/dropout/<name>.yaml``: ``name`` and the options."""
        # Annotations are strings under ``from __future__ import annotations``: resolve them,
        # so that OmegaConf sees the types.
        hints = typing.get_type_hints(self.options)
        fields = [("name", str, field(default=self.name))]
        for option in dataclasses.fields(self.options):
            default = (field(default_factory=option.default_factory)
                       if option.default_factory is not dataclasses.MISSING else field(default=option.default))
            fields.append((option.name, hints[option.name], default))
        return dataclasses.make_dataclass(f"{self.options.__name__}Schema", fields)


def schema_name(method: str) -> str:
    """The ConfigStore name of a method's schema, first in its config file's defaults."""
    return f"{method}_schema"


def register_schemas(methods: Mapping[str, Method]) -> None:
    """Store every method's schema in Hydra's ConfigStore, group ``dropout``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, method in methods.items():
        store.store(group="dropout", name=schema_name(name), node=method.schema())
