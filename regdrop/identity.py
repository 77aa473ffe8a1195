"""A run's identity: the hash of its resolved config minus the keys that only say where or
how fast it runs (`RUNTIME_KEYS`), and the names of its folders (``regdrop_run`` and
``regdrop_sweep``, the resolvers of conf/hydra/default.yaml). Nothing here reads or writes a
run folder: that is `regdrop.runfolder`'s work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that do not change what a run computes, only where or how fast: not in the identity.
RUNTIME_KEYS = (
    "hydra", "paths", "logger", "tags", "optimized_metric", "task_name", "table",
    "trainer.device", "trainer.progress", "trainer.threads", "trainer.log_every",
    "trainer.checkpoint_every", "trainer.keep_best", "trainer.resume", "trainer.rerun",
    "trainer.compile", "trainer.compile_backend", "trainer.deterministic",
    "data.root", "data.download", "data.num_workers", "data.eval_batch_size",
)


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus `RUNTIME_KEYS`: what decides a run's result."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in RUNTIME_KEYS:
        section, _, leaf = key.rpartition(".")
        holder = plain.get(section) if section else plain
        if isinstance(holder, dict):
            holder.pop(leaf, None)
    return OmegaConf.to_container(OmegaConf.create(plain), resolve=True)


def config_hash(cfg: DictConfig) -> str:
    """12 hex digits of the SHA-1 of `identity`."""
    text = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


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
