"""How a run appears in wandb: so that a sweep's dashboard reads like its table.

* **group**: a multirun's jobs share one group, named like the sweep folder
  (``<experiment or sweep>-<hash>``); a single run is a group of its own, named like its run
  folder (``<experiment or data-model-method>-<config hash>``);
* **name**: in a multirun, the keys the sweep varies with this job's values
  (``dropout.sigma=256,dropout.tau=16,seed=0``: unique within the sweep); a single run
  keeps a short readable name (``gyro-constant-seed0``);
* **job_type**: the run's row of the table, labelled as ``regdrop.report`` labels it (the
  ``table.rows`` keys of an experiment, else every swept key but the seed); a single run
  outside a table: its method;
* **tags**: the config's ``tags``, then the experiment, method, schedule, model and data,
  and ``mini`` or ``paper`` for the two kinds of experiment tables;
* **config columns**: the swept keys, the method's effective hyper-parameters (after the
  model's recommendations: ``method.sigma``...), ``global_batch`` and ``lr_used`` (the rate
  after batch scaling) as top-level config entries, beside the whole nested config;
* **metrics**: `define_metrics` declares ``step`` (optimizer steps) as the x axis of the
  training and evaluation keys, ``best/test_acc`` summarized as its max and ``test/*`` as
  their last value (what the report's tables show); diagnostics (``diag/*``) and MC-dropout
  (``mc/*``) keys have their own x axis, ``diag/step``;
* **checkpoints**: `log_checkpoints` turns ``checkpoint.pt`` (``last``) and ``best.pt``
  (``best``) into wandb Artifacts when ``logger.log_checkpoints`` asks for them.

Everything here is read from the config and from Hydra's record of the job (its overrides,
the sweep's ``multirun.yaml``); the sweep's keys are found as the report finds them
(`regdrop.report.runs`), so the dashboard and ``report.md`` agree. User values of
``logger.group``, ``logger.run_name`` and ``logger.job_type`` win over the automatic ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regdrop.errors import ConfigError

CHECKPOINT_CHOICES = ("none", "best", "last", "all")
# wandb refuses tags longer than this; the label is cut rather than the run failing.
MAX_TAG_LENGTH = 64
# The x axis of the diagnostics and MC-dropout keys (added to their wandb records only).
DIAG_STEP = "diag/step"


def check_log_checkpoints(logger: DictConfig) -> None:
    """``logger.log_checkpoints``: one of `CHECKPOINT_CHOICES`; ``best`` and ``all`` need
    ``best.pt``, which only ``trainer.keep_best=true`` writes."""
    value = logger.get("log_checkpoints", "none")
    if value not in CHECKPOINT_CHOICES:
        raise ConfigError("logger.log_checkpoints", f"must be one of {', '.join(CHECKPOINT_CHOICES)} "
                          f"(which checkpoints become wandb artifacts), got {value!r}")
    # The logger section's parent is the whole config (check_logger is given the section).
    root = logger._get_root() if isinstance(logger, DictConfig) else None  # noqa: SLF001
    keep_best = OmegaConf.select(root, "trainer.keep_best", default=None) if root is not None else None
    if value == "best" and keep_best is False:
        raise ConfigError("logger.log_checkpoints", "best logs best.pt, the checkpoint of the best test "
                          "accuracy, which only trainer.keep_best=true writes; add trainer.keep_best=true "
                          "or log the last checkpoint (logger.log_checkpoints=last)")


@dataclass
class RunLabels:
    """What a run is called in wandb and where it sits (module doc)."""

    group: str
    name: str
    job_type: str
    tags: list[str]
    columns: dict[str, Any] = field(default_factory=dict)  # swept key -> this run's value


def run_labels(cfg: DictConfig) -> RunLabels:
    """The group, name, job type, tags and swept-key columns of the run of ``cfg``, from
    Hydra's record of the job (a run composed without Hydra is a single run)."""
    from regdrop.identity import run_name
    from regdrop.report.runs import Job, format_value, ignored_key, override_key, parse_overrides

    hydra = _hydra_config()
    task = [str(o) for o in hydra.overrides.task] if hydra is not None else []
    choices = {}
    if hydra is not None:
        choices = {str(k): v for k, v in OmegaConf.to_container(hydra.runtime.choices).items()
                   if not str(k).startswith("hydra/")}
    experiment = choices.get("experiment")
    job = Job(Path(cfg.paths.output_dir), cfg, parse_overrides(task), choices)
    sweep_dir = _sweep_dir(hydra)
    swept = _swept_keys(sweep_dir, hydra, task) if sweep_dir is not None else []

    if sweep_dir is not None:
        group = sweep_dir.name
    else:
        group = run_name(_with_choices(cfg, experiment)).replace("/", "-")
    if swept:
        named = swept + ([] if "seed" in swept else ["seed"])
        name = ",".join(f"{key}={job.override_value(key)}" for key in named)
    else:
        name = f"{cfg.dropout.name}-{cfg.schedule.name}-seed{cfg.seed}"

    rows = OmegaConf.select(cfg, "table.rows", default=None)
    row_keys = list(rows) if rows else [k for k in swept if not ignored_key(k)]
    row = " / ".join(v for v in (job.override_value(k) for k in row_keys) if v is not None)
    job_type = row or str(cfg.dropout.name)

    columns = {}
    for key in swept:
        value = job.value(key)
        if isinstance(value, dict | list) or value is None:
            value = job.override_value(key)
        # A swept config group (dropout=gyro,standard) would replace the nested section.
        column = f"{key}_option" if key in cfg and isinstance(cfg[key], DictConfig) else key
        columns[column] = value if isinstance(value, bool | int | float | str) else format_value(value)

    kind = None if experiment is None else ("mini" if str(experiment).startswith("mini") else "paper")
    given = list(OmegaConf.select(cfg, "logger.tags", default=None) or [])
    wanted = [*given, experiment, cfg.dropout.name, cfg.schedule.name, cfg.model.name, cfg.data.name, kind]
    tags = list(dict.fromkeys(str(t)[:MAX_TAG_LENGTH] for t in wanted if t not in (None, "")))

    logger = cfg.logger
    return RunLabels(group=logger.get("group") or group, name=logger.get("run_name") or name,
                     job_type=str(logger.get("job_type") or job_type)[:MAX_TAG_LENGTH], tags=tags,
                     columns={override_key(k): v for k, v in columns.items()})


def method_columns(cfg: DictConfig, method_options: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The top-level config columns known once the run is built: the method and its
    effective hyper-parameters (``method.<option>``), the global batch and the rate used."""
    from regdrop.optim import scaled_lr

    global_batch = cfg.data.batch_size * cfg.trainer.grad_accum * world_size
    columns: dict[str, Any] = {"method": cfg.dropout.name}
    for option, value in method_options.items():
        columns[f"method.{option}"] = value if isinstance(value, bool | int | float | str | None) else str(value)
    columns["global_batch"] = global_batch
    columns["lr_used"] = scaled_lr(cfg.optim, global_batch)
    return columns


def define_metrics(run) -> None:
    """Declare the x axes and the summaries the table reads (module doc)."""
    run.define_metric("step")
    for key in ("epoch", "lr", "samples_per_s", "train/*"):
        run.define_metric(key, step_metric="step")
    run.define_metric("test/*", step_metric="step", summary="last")
    run.define_metric("best/test_acc", step_metric="step", summary="max")
    run.define_metric(DIAG_STEP)
    for key in ("diag/*", "mc/*"):
        run.define_metric(key, step_metric=DIAG_STEP)


# The summary keys whose wandb summary comes from their logged history (`define_metrics`):
# the run's end does not overwrite them with a plain value.
DERIVED_SUMMARIES = ("best/test_acc", "test/acc", "test/loss")


def wandb_record(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl record as wandb gets it: ``step`` goes as the log's step and as the x
    axis; a diagnostics record gets its own x axis (`DIAG_STEP`)."""
    if any(str(key).startswith("diag/") for key in record) and "step" in record:
        return {**record, DIAG_STEP: record["step"]}
    return dict(record)


def log_checkpoints(run, cfg: DictConfig, checkpoints: dict[str, Path], step: int | None) -> None:
    """One wandb Artifact per checkpoint kind asked for (``logger.log_checkpoints``), named
    ``checkpoint-<kind>-<config hash>``, with the config hash, the kind and the step as metadata."""
    import wandb

    from regdrop.identity import config_hash

    wanted = cfg.logger.get("log_checkpoints", "none")
    kinds = ("best", "last") if wanted == "all" else (() if wanted == "none" else (wanted,))
    digest = config_hash(cfg)
    for kind in kinds:
        path = checkpoints.get(kind)
        if path is None or not Path(path).is_file():
            continue
        artifact = wandb.Artifact(f"checkpoint-{kind}-{digest}", type="model",
                                  metadata={"config_hash": digest, "kind": kind, "step": step})
        artifact.add_file(str(path))
        run.log_artifact(artifact, aliases=[kind, "latest"])


def _hydra_config():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except ValueError:
        return None


def _sweep_dir(hydra) -> Path | None:
    """The sweep folder of a multirun job (None for a single run)."""
    from hydra.types import RunMode

    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hydra.sweep.dir))


def _swept_keys(sweep_dir: Path, hydra, task: list[str]) -> list[str]:
    """The override keys the sweep varies, in the sweep's order: from its ``multirun.yaml``
    as the report reads it; an Optuna search (whose ranges that reader does not expand):
    its search space's keys; failing both, every override of this job."""
    from regdrop.report.runs import override_key, parse_overrides, sweep_grid

    try:
        swept = sweep_grid(sweep_dir / "multirun.yaml").swept
    except Exception:  # noqa: BLE001 - no grid to read: the fallbacks below name the job
        swept = []
        params = OmegaConf.select(hydra, "sweeper.params", default=None)
        if params:
            swept = [str(k) for k in params]
        if not swept:
            swept = list(parse_overrides(task))
    return list(dict.fromkeys(override_key(k) for k in swept))


def _with_choices(cfg: DictConfig, experiment: str | None) -> DictConfig:
    """``cfg`` with the experiment Hydra chose, as `regdrop.identity.run_name` reads it."""
    if experiment is None or OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None):
        return cfg
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.update(copy, "hydra", {"runtime": {"choices": {"experiment": experiment}}}, force_add=True)
    return copy
