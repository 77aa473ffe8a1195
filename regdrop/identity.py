"""A run's identity, and the names of its folders (``regdrop_run`` and ``regdrop_sweep``,
the resolvers of conf/hydra/default.yaml). Nothing here reads or writes a run folder: that
is `regdrop.opening`'s work.

The identity is a signature (Dora's): the run's choices of config options and the keys
whose value differs from what those choices compose to by default, hashed; the keys
outside a result (`regdrop.runfolder.OUTSIDE_RESULT`) are left out. The alternative was to
keep hashing the whole resolved config and store it, checking it on reopening. That hash
changes whenever a release adds a key, so the same command after an upgrade looks for
another folder and trains its finished and half-finished runs again from zero; a stored
config cannot help a run that never finds it. The signature does not move when a key is
added with a default (a default is not a change from the defaults), so the run finds its
folder; what it cannot see, a default that changed under a run, is caught by the other
half, which is kept: the folder stores the resolved config (``.hydra/config.yaml``) and
`regdrop.opening` compares it on reopening, refusing to reuse the run when a value differs
(the key, the old and the new value, the ways forward). A key added to the run's config
since, absent from the stored one, is the one difference taken as the old behaviour.

The defaults are composed with Hydra from the same config tree as the run (so an edited
tree, ``--config-path``, is the one compared with); a run composed without Hydra (a test,
a notebook) has no record of its choices and is compared with the primary config's
defaults. Folders named by the former hash of the whole config (`legacy_hash`) are found
and taken over by `regdrop.opening` when they hold this very config.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regdrop.runfolder import OUTSIDE_RESULT, outside_result

CONF = Path(__file__).resolve().parents[1] / "conf"
PRIMARY = "train"  # conf/train.yaml
RUNTIME_KEYS = OUTSIDE_RESULT  # the former name, for callers


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus `OUTSIDE_RESULT`: what decides a run's result."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in OUTSIDE_RESULT:
        section, _, leaf = key.rpartition(".")
        holder = plain.get(section) if section else plain
        if isinstance(holder, dict):
            holder.pop(leaf, None)
    return OmegaConf.to_container(OmegaConf.create(plain), resolve=True)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.epochs": 2, ...}``: every leaf of a nested config by its dotted key (a
    list is one value)."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def choices_of(cfg: DictConfig) -> dict[str, str] | None:
    """The config options the run chose (``model: resnet18``), those outside a result left
    out; None for a config composed without Hydra's record of them."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices
    else:
        chosen = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
        if chosen is None or "model" not in chosen:  # only a part of the record
            return None
    return {str(group): str(option) for group, option in chosen.items()
            if option is not None and not outside_result(str(group))}


def signature(cfg: DictConfig) -> dict[str, Any]:
    """The run's choices and its keys that differ from their defaults (module doc)."""
    choices = choices_of(cfg)
    defaults = flatten(_defaults(tuple(sorted((choices or {}).items())), _config_sources()))
    changed = {key: value for key, value in flatten(identity(cfg)).items()
               if key not in defaults or defaults[key] != value}
    return {"choices": choices or {}, "changed": changed}


def config_hash(cfg: DictConfig) -> str:
    """12 hex digits of the SHA-1 of the run's `signature`."""
    return _digest(signature(cfg))


def legacy_hash(cfg: DictConfig) -> str:
    """The former identity: 12 hex digits of the SHA-1 of the whole `identity`."""
    return _digest(identity(cfg))


def _digest(tree: dict[str, Any]) -> str:
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _config_sources() -> tuple[str, ...]:
    """The config tree the running Hydra app reads (its search path); () for none."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return ()
    return tuple(source.path for source in GlobalHydra.instance().config_loader().get_sources())


@functools.lru_cache(maxsize=64)
def _defaults(choices: tuple[tuple[str, str], ...], sources: tuple[str, ...]) -> dict[str, Any]:
    """The `identity` of what ``choices`` compose to with no other override, from the
    config tree ``sources`` (the running Hydra app's; () for regdrop's own conf/)."""
    from hydra import compose, initialize_config_dir

    overrides = [f"{group}={option}" for group, option in choices]
    if sources:
        return identity(_compose_defaults(compose, overrides))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return identity(_compose_defaults(compose, overrides))


def _compose_defaults(compose, overrides: list[str]) -> DictConfig:
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg  # compose replaces Hydra's record of the running job
    try:
        return compose(config_name=_primary(), overrides=overrides)
    finally:
        HydraConfig.instance().cfg = saved


def _primary() -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().job.config_name or PRIMARY
    return PRIMARY


def run_name(cfg: DictConfig) -> str:
    """``<experiment or data-model-method>/<hash>``: readable, then exact."""
    experiment = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None)
    group = experiment or f"{cfg.data.name}-{cfg.model.name}-{cfg.dropout.name}"
    return f"{group}/{config_hash(cfg)}"


def sweep_name(experiment: str | None, overrides: Sequence[str]) -> str:
    """A multirun's folder: ``<experiment or 'sweep'>-<hash of the command's overrides>``,
    the same each time the same sweep is launched, so a re-launch finds its jobs."""
    digest = hashlib.sha1(json.dumps(sorted(overrides)).encode()).hexdigest()[:8]
    return f"{experiment or 'sweep'}-{digest}"


def register_resolvers() -> None:
    """``${regdrop_run:}`` and ``${regdrop_sweep:EXPERIMENT,OVERRIDES}`` for Hydra's run and
    sweep folders (conf/hydra/default.yaml)."""
    if not OmegaConf.has_resolver("regdrop_run"):
        OmegaConf.register_new_resolver("regdrop_run", lambda *, _root_: run_name(_root_))
        # Cached: the launcher resolves the sweep folder from the whole command and hands
        # its resolver cache to every job (Hydra's load_sweep_config, as for ${now:}); a
        # job's own hydra.overrides.task is its share of the sweep only, so resolved again
        # there each job would get a folder of its own.
        OmegaConf.register_new_resolver(
            "regdrop_sweep", lambda experiment, overrides: sweep_name(experiment, list(overrides)),
            use_cache=True)
