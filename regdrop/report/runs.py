"""Read the runs of one or several multirun folders: configs, overrides, metrics and status.

A job is any folder below the given roots that holds ``.hydra/config.yaml`` (the folder
layout beneath the root does not matter: numbered jobs, or ``<group>/<config hash>``). Only
the project's own files are read (``metrics.jsonl``, ``metrics.json``, ``run.json``), so it
works offline, on a finished sweep or on one still running.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regdrop.runfolder import (
    CONFIG,
    HYDRA,
    METRICS_LOG,
    OVERRIDES,
    STATUS,
    SUMMARY,
    SWEEP_CONFIG,
    RunStatus,
    outside_result,
    read_failed_jobs,
)

# Statuses a job can have: what run.json says (`RunStatus`), and what the report tells from
# the files besides. Finished jobs count in the table; every other one is named in the
# report's list of what is missing.
FINISHED = RunStatus.FINISHED.value
RUNNING = RunStatus.RUNNING.value
FAILED = RunStatus.FAILED.value
PREEMPTED = RunStatus.PREEMPTED.value
DIVERGED = RunStatus.DIVERGED.value
INTERRUPTED = RunStatus.INTERRUPTED.value
KILLED = "killed"
STOPPED = "stopped"  # no summary and no run.json: killed or crashed, the files cannot tell
FAILED_EARLY = "failed before training"
UNREADABLE = "unreadable"  # a file of the job folder is torn or garbage: named in the detail
# What run.json says; any other word it holds is reported as it is.
RUN_STATUSES = tuple(status.value for status in RunStatus)

# A running run whose files have not changed for this long is taken as dead (runs on other
# hosts, whose pid cannot be checked from here).
DEFAULT_STALE_S = 15 * 60

# Override keys that never split a cell: the seed is averaged over, and the keys outside a
# result (`regdrop.runfolder.OUTSIDE_RESULT`, the run identity's list too) change where and
# how a run is executed or logged, not its result.
AVERAGED = "seed"

_MISSING = object()


@dataclass
class Job:
    """One Hydra job folder and everything the report needs from it."""

    path: Path
    config: DictConfig
    overrides: dict[str, str]  # override key (as written, with any +/~ prefix) -> value
    choices: dict[str, str | None] = field(default_factory=dict)  # config group -> option
    summary: dict[str, Any] | None = None  # metrics.json
    train: list[dict[str, Any]] = field(default_factory=list)  # step records, one per step
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluation records
    diagnostics: list[dict[str, Any]] = field(default_factory=list)  # diag/* records, by step
    run_info: dict[str, Any] | None = None  # run.json
    status: str = FAILED_EARLY
    detail: str = ""

    @property
    def seed(self) -> Any:
        return self.value("seed")

    def value(self, key: str, default: Any = None) -> Any:
        """The job's value of a dotted config key, or of a config group (its option)."""
        if key in self.choices:
            return self.choices[key]
        found = OmegaConf.select(self.config, key, default=_MISSING,
                                 throw_on_resolution_failure=False)
        if found is _MISSING:
            return default
        if isinstance(found, DictConfig) or OmegaConf.is_list(found):
            return OmegaConf.to_container(found, resolve=False)
        return found

    def override_value(self, key: str) -> str | None:
        """The job's value of an override key as a string: the override itself when the job
        was launched with it, else the config group's option or the config value."""
        for written, value in self.overrides.items():
            if override_key(written) == key:
                return value
        value = self.value(key, _MISSING)
        return None if value is _MISSING else format_value(value)

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.train] + [r["step"] for r in self.evals]
        return max(steps) if steps else None


def override_key(written: str) -> str:
    """An override's key without Hydra's ``+``, ``++`` or ``~`` prefix."""
    return written.lstrip("+~")


def ignored_key(key: str) -> bool:
    """Whether override ``key`` never splits a cell: the seed, or a key outside a result."""
    key = override_key(key)
    return key == AVERAGED or outside_result(key)


def result_overrides(overrides: Mapping[str, str]) -> dict[str, str]:
    """The overrides that decide a run's result: keys without prefix, the keys outside a
    result left out (the seed is kept: a job's identity within its cell)."""
    return {override_key(k): v for k, v in overrides.items() if not outside_result(override_key(k))}


def format_value(value: Any) -> str:
    """A config value as it reads in a label: ``0.5``, ``16``, ``gyro``, ``[fc, conv]``."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def is_diagnostics_record(record: Mapping[str, Any]) -> bool:
    """Diagnostics records (regdrop.diagnostics) carry ``diag/*`` keys and no training loss."""
    return "train/loss" not in record and any(str(k).startswith("diag/") for k in record)


def read_diagnostics(path: Path) -> list[dict]:
    """The diagnostics records of a ``metrics.jsonl``, one per step (the last one wins)."""
    found: dict[int, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and is_diagnostics_record(record):
                found[record["step"]] = record
    return [found[s] for s in sorted(found)]


def is_eval_record(record: Mapping[str, Any]) -> bool:
    """Evaluation records carry test metrics; step records carry the step's training loss."""
    return "test/acc" in record or "test/loss" in record


def read_metrics_log(path: Path) -> tuple[list[dict], list[dict], int]:
    """The step records and the evaluation records of a ``metrics.jsonl``, each sorted by
    step, and the number of lines that could not be read.

    A resumed run appends to the file from its checkpoint on, so a step can appear twice:
    the last occurrence of each (step, kind) wins. When a step number goes back (a resume
    from an earlier checkpoint), the records of the abandoned attempt past that point are
    dropped too, even those the new attempt has not reached again: a step record of step
    ``s`` means every later step and every evaluation after ``s`` steps came from the old
    attempt. A torn last line (a killed run) is skipped and counted.
    """
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if isinstance(record, dict) and "gap" in record:
                    continue  # steps a crash lost, marked by the resume (metrics.json's metrics_gaps)
                step = record["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
                continue
            if not isinstance(step, int) or isinstance(step, bool):
                bad += 1
                continue
            if is_diagnostics_record(record):
                continue  # read_diagnostics
            if is_eval_record(record):
                # An evaluation after `step` steps: the old attempt's steps from `step` on
                # and its evaluations from `step` on are superseded.
                if evals and step <= max(evals):
                    _drop(evals, lambda s, step=step: s >= step)
                    _drop(train, lambda s, step=step: s >= step)
                evals[step] = record
            else:
                if train and step <= max(train):
                    _drop(train, lambda s, step=step: s >= step)
                    _drop(evals, lambda s, step=step: s > step)
                train[step] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], bad


def _drop(records: dict[int, dict], condition) -> None:
    for step in [s for s in records if condition(s)]:
        del records[step]


def _read_json(path: Path) -> tuple[Any, str]:
    """The JSON value in ``path`` (None if absent) and a note when it cannot be read."""
    if not path.exists():
        return None, ""
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except (OSError, ValueError) as err:  # ValueError: bad JSON, bad UTF-8
        return None, f"{path.name} unreadable ({err.__class__.__name__})"


def _read_overrides(path: Path) -> dict[str, str]:
    """``overrides.yaml`` as {key: value string}, normalised as Hydra's sweeper writes them."""
    if not path.exists():
        return {}
    lines = OmegaConf.to_container(OmegaConf.load(path)) or []
    return parse_overrides(str(line) for line in lines)


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """Parse override strings with Hydra's own parser: {key with prefix: value string}.

    Sweep overrides (``a=1,2``) keep their sweep string; `sweep_grid` expands them.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(lines))
    result = {}
    for override in parsed:
        value = override.value()
        if value is None:
            text = ""
        elif override.is_sweep_override():
            text = ",".join(override.sweep_string_iterator())
        else:
            text = override.get_value_element_as_str()
        result[override.get_key_element()] = text
    return result


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _age_s(iso: Any, now: float) -> float | None:
    """Seconds since the ISO time ``iso`` (naive times are local), None if unreadable."""
    try:
        moment = datetime.fromisoformat(str(iso))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return now - moment.timestamp()
    return (datetime.fromtimestamp(now, timezone.utc) - moment).total_seconds()


def job_status(job: Job, *, stale_s: float = DEFAULT_STALE_S, now: float | None = None,
               host: str | None = None) -> tuple[str, str]:
    """The job's status and a short detail, from ``run.json`` when present, else from the
    metrics files.

    A run that ``run.json`` calls running is taken as killed when its process is gone
    (same host) or when neither ``run.json`` nor ``metrics.jsonl`` changed for ``stale_s``.
    Without ``run.json``, a job with step records but no summary is "stopped" (killed or
    crashed: the files cannot tell which) unless its log changed within ``stale_s``.
    """
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    log = job.path / METRICS_LOG
    log_age = now - log.stat().st_mtime if log.exists() else None
    info = job.run_info
    if isinstance(info, Mapping) and isinstance(info.get("status"), str) and info["status"]:
        status = info["status"]
        note = str(info.get("error") or info.get("message") or "")
        if status == RUNNING:
            ages = [a for a in (_age_s(info.get("updated"), now), log_age) if a is not None]
            age = min(ages) if ages else None
            pid = info.get("pid")
            if info.get("host") == host and isinstance(pid, int) and not pid_alive(pid):
                return KILLED, f"{STATUS} says running, but pid {pid} is gone on {host}"
            if age is not None and age > stale_s:
                return KILLED, f"{STATUS} says running, but nothing changed for {age / 60:.0f} min"
            return RUNNING, f"on {info.get('host', '?')}, pid {pid}"
        if status == FINISHED and job.summary is None:
            return STOPPED, f"{STATUS} says finished, but {SUMMARY} is missing"
        return status, note
    if job.summary is not None:
        return FINISHED, ""
    if job.train or job.evals:
        if log_age is not None and log_age <= stale_s:
            return RUNNING, f"{METRICS_LOG} written {log_age:.0f} s ago (no {STATUS})"
        return STOPPED, "no metrics.json: killed or crashed (no run.json to tell which)"
    return FAILED_EARLY, ("no metrics were written: the run stopped before training (a bad "
                          "config value, say; the sweep's console output has the error)")


def _unreadable(path: Path, err: Exception) -> str:
    return f"{path.name} unreadable ({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def load_job(path: Path, *, stale_s: float = DEFAULT_STALE_S) -> Job:
    """Read the job folder ``path`` (the folder that holds ``.hydra``).

    A torn or garbage ``.hydra/config.yaml`` or ``metrics.json`` makes the job
    ``unreadable`` with the file and the error in its detail (its overrides, when they can
    be read, still place it in its cell); nothing here raises for a damaged file.
    """
    notes = []
    try:
        config = OmegaConf.load(path / CONFIG)
        if not isinstance(config, DictConfig):
            raise ValueError("not a mapping")
        config_error = ""
    except Exception as err:  # noqa: BLE001 - any damage is reported, never raised
        config, config_error = OmegaConf.create({}), _unreadable(path / CONFIG, err)
    choices: dict[str, str | None] = {}
    hydra_file = path / HYDRA
    if hydra_file.exists():
        try:
            found = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices")
            if found is not None:
                choices = {str(k): v for k, v in OmegaConf.to_container(found).items()
                           if not str(k).startswith("hydra/")}
        except Exception as err:  # noqa: BLE001
            notes.append(_unreadable(hydra_file, err))
    try:
        overrides = _read_overrides(path / OVERRIDES)
    except Exception as err:  # noqa: BLE001
        overrides = {}
        notes.append(_unreadable(path / OVERRIDES, err))
    job = Job(path=path, config=config, overrides=overrides, choices=choices)
    summary, summary_error = _read_json(path / SUMMARY)
    job.summary = summary if isinstance(summary, dict) else None
    if summary is not None and job.summary is None and not summary_error:
        summary_error = f"{SUMMARY} unreadable (not a JSON object)"
    if (path / METRICS_LOG).exists():
        try:
            job.train, job.evals, bad = read_metrics_log(path / METRICS_LOG)
            job.diagnostics = read_diagnostics(path / METRICS_LOG)
        except OSError as err:
            bad = 0
            notes.append(_unreadable(path / METRICS_LOG, err))
        if bad:
            notes.append(f"{bad} unreadable line(s) in {METRICS_LOG}")
    if job.summary and job.summary.get("metrics_gaps"):
        notes.append(f"{METRICS_LOG} lacks the steps a crash lost: {job.summary['metrics_gaps']}")
    run_info, note = _read_json(path / STATUS)
    job.run_info = run_info if isinstance(run_info, dict) else None
    notes.append(note)
    damaged = [e for e in (config_error, summary_error) if e]
    if damaged:
        job.status = UNREADABLE
        detail = ("; ".join(damaged) + ": the job is not counted; delete or repair the file, "
                  "or run the job again (trainer.rerun=true)")
    else:
        job.status, detail = job_status(job, stale_s=stale_s)
    job.detail = "; ".join(n for n in (detail, *notes) if n)
    return job


def find_job_dirs(root: Path) -> list[Path]:
    """Every folder below ``root`` (or ``root`` itself) holding ``.hydra/config.yaml``,
    in natural order (``2`` before ``10``)."""
    found = {p.parent.parent for p in root.rglob(CONFIG)}
    return sorted(found, key=lambda p: natural_key(str(p)))


def natural_key(text: str) -> list:
    """Sort key that orders the digit runs of ``text`` by number."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", text) if part]


def load_jobs(roots: Iterable[Path], *, stale_s: float = DEFAULT_STALE_S) -> list[Job]:
    """Every job below the ``roots``, each read once."""
    seen: set[Path] = set()
    jobs = []
    for root in roots:
        for path in find_job_dirs(Path(root)):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                jobs.append(load_job(path, stale_s=stale_s))
    return jobs


# -- the grid a multirun was launched with ---------------------------------------------------


@dataclass
class Sweep:
    """The grid of one multirun: its root, the overrides of every job it launches, and the
    keys it sweeps (those with more than one value)."""

    root: Path
    jobs: list[dict[str, str]]
    swept: list[str] = field(default_factory=list)
    error: str = ""  # why multirun.yaml could not be read


def sweep_grid(multirun_yaml: Path) -> Sweep:
    """Every job a multirun launches, as its overrides, from the root's ``multirun.yaml``:
    ``hydra.overrides.task`` (the command line) and ``hydra.sweeper.params`` (sweeps set in
    config files; the command line wins for a key in both), expanded as Hydra's basic
    sweeper expands them (a product of the sweeps, in command-line order)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.load(multirun_yaml)
    task = [str(o) for o in (OmegaConf.select(cfg, "hydra.overrides.task") or [])]
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    lines = list(task)
    if params:
        given = {override_key(line.split("=", 1)[0]) for line in task}
        lines = [f"{k}={v}" for k, v in OmegaConf.to_container(params).items()
                 if override_key(str(k)) not in given] + lines
    parsed = OverridesParser.create().parse_overrides(lines)
    axes, swept = [], []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            axes.append([(key, v) for v in override.sweep_string_iterator()])
            if len(axes[-1]) > 1:
                swept.append(key)
        else:
            value = override.value()
            axes.append([(key, "" if value is None else override.get_value_element_as_str())])
    return Sweep(multirun_yaml.parent, [dict(combo) for combo in itertools.product(*axes)],
                 swept)


def find_sweeps(roots: Iterable[Path]) -> list[Sweep]:
    """The grid of every ``multirun.yaml`` at or below the ``roots``."""
    sweeps = []
    for root in roots:
        for path in sorted(Path(root).rglob(SWEEP_CONFIG)):
            try:
                sweeps.append(sweep_grid(path))
            except Exception as err:  # a hand-edited file must not stop the report
                sweeps.append(Sweep(path.parent, [], error=f"{err.__class__.__name__}: {err}"))
    return sweeps


def failed_jobs(root: Path) -> list[tuple[dict[str, str], str]]:
    """(overrides, message) of each job the sweep at ``root`` recorded as failed
    (`regdrop.runfolder.FailedJob`), oldest first."""
    failures = []
    for record in read_failed_jobs(root)[0]:
        try:
            overrides = parse_overrides(record.overrides)
        except Exception:  # noqa: BLE001 - an override an older regdrop split at its spaces
            continue
        failures.append((overrides, record.message))
    return failures


@dataclass
class ExpectedJob:
    """A job a sweep launches that has no folder: never started, or rejected before its
    folder was written (then ``failed_jobs.txt`` may hold its error)."""

    overrides: dict[str, str]
    sweep: Sweep
    status: str = "missing"
    detail: str = ""

    @property
    def seed(self) -> str:
        return next((v for k, v in self.overrides.items() if override_key(k) == "seed"), "")

    def label(self) -> str:
        """The values of the keys its sweep varies: ``dropout=gyro seed=1``."""
        return " ".join(f"{override_key(k)}={self.overrides[k]}" for k in self.sweep.swept
                        if k in self.overrides) or "?"


def missing_jobs(sweeps: Iterable[Sweep], jobs: Iterable[Job]) -> list[ExpectedJob]:
    """The jobs the sweeps launch for which no job folder exists. A folder holds a job when
    its overrides are the job's, up to the keys that do not change a result (`outside_result`: a
    resumed job may carry ``trainer.resume``, say). A job the sweep recorded as failed is
    "failed before training", with the recorded error; the others are "missing"."""
    present = [result_overrides(job.overrides) for job in jobs]
    missing: list[ExpectedJob] = []
    seen: list[dict[str, str]] = []
    for sweep in sweeps:
        failures = failed_jobs(sweep.root)
        for expected in sweep.jobs:
            wanted = result_overrides(expected)
            if wanted in present or wanted in seen:
                continue
            seen.append(wanted)
            errors = [message for overrides, message in failures
                      if result_overrides(overrides) == wanted]
            if errors:  # the newest failure is the one that counts
                missing.append(ExpectedJob(expected, sweep, FAILED_EARLY, errors[-1]))
            else:
                missing.append(ExpectedJob(
                    expected, sweep, "missing",
                    "the sweep launches this job, but no folder holds it (never started, or "
                    "stopped before its folder was written)"))
    return missing


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
