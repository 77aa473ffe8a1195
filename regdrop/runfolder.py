"""The run folder's contract: the names of its files, the statuses a run can have, the
keys of a config that do not change a run's result, and the sweep's record of failed jobs.

Every module that writes or reads a run folder (the trainer, the tracker, the checkpoints,
the report, the command line) takes these names from here, so a file is renamed or a
status added in one place. Nothing here imports the rest of regdrop: it is the floor the
others stand on. What a run does with its folder when it opens it (fresh, resume, finished,
refused) is `regdrop.opening`'s work; how a run is named, `regdrop.identity`'s.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

# The files of a run folder.
METRICS_LOG = "metrics.jsonl"  # one JSON line per step and per evaluation, flushed as written
SUMMARY = "metrics.json"  # the final summary: present only when the run finished
STATUS = "run.json"  # the run's `RunStatus`, pid, host and times
CHECKPOINT = "checkpoint.pt"  # the last checkpoint
PREVIOUS = "checkpoint.prev.pt"  # the one before it (a damaged latest one costs one interval)
BEST = "best.pt"  # the one with the best test accuracy (trainer.keep_best)
SURGERY = "surgery.txt"  # which layers the dropout method replaced or wrapped
ENVIRONMENT = "environment.json"  # the run's identity, git commit and library versions
TRAIN_LOG = "train.log"  # everything the run printed
SCHEDULE_PLOT = "drop_schedule.png"
CONFIG_DIR = ".hydra"  # config.yaml, overrides.yaml, hydra.yaml
CONFIG = f"{CONFIG_DIR}/config.yaml"
OVERRIDES = f"{CONFIG_DIR}/overrides.yaml"
HYDRA = f"{CONFIG_DIR}/hydra.yaml"
WANDB_DIR = "wandb"
LOCK = ".lock"
# What a rerun moves aside to ``previous-<time>/``: everything a run writes.
RESULT_FILES = (SUMMARY, METRICS_LOG, STATUS, CHECKPOINT, PREVIOUS, BEST, SURGERY, TRAIN_LOG,
                SCHEDULE_PLOT, ENVIRONMENT, CONFIG_DIR, WANDB_DIR)

# The files of a sweep folder.
FAILED_JOBS = "failed_jobs.txt"  # `FailedJob` records, one JSON line each
SWEEP_CONFIG = "multirun.yaml"


class RunStatus(str, Enum):
    """What ``run.json`` says about a run (a `str`, so it is written and compared as one)."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    PREEMPTED = "preempted"  # stopped by SIGTERM / SIGUSR1 (a scheduler): resumable
    INTERRUPTED = "interrupted"  # stopped by Ctrl-C: resumable
    DIVERGED = "diverged"  # the loss stopped being finite

    def __str__(self) -> str:
        return self.value


# Keys that say where, how fast or how visibly a run runs, never what it computes: outside
# the run's identity (`regdrop.identity`) and never a cell of the report (which also
# averages over ``seed``, a key that does change the result). A key names a config node
# (and everything below it) or a config group (``local``, ``logger``: its option).
OUTSIDE_RESULT = (
    "hydra", "paths", "logger", "local", "tags", "optimized_metric", "task_name", "table",
    "trainer.device", "trainer.progress", "trainer.threads", "trainer.log_every",
    "trainer.checkpoint_every", "trainer.keep_best", "trainer.resume", "trainer.rerun",
    "trainer.compile", "trainer.compile_backend", "trainer.deterministic",
    "data.root", "data.download", "data.num_workers", "data.eval_batch_size",
)


def outside_result(key: str) -> bool:
    """Whether config key or group ``key`` (``trainer.device``, ``hydra/launcher``) is one of
    `OUTSIDE_RESULT` or below one."""
    return any(key == k or key.startswith((k + ".", k + "/")) for k in OUTSIDE_RESULT)


@dataclass
class FailedJob:
    """One job of a sweep that failed cleanly (a rejected config writes no job folder): a
    JSON line of the sweep's ``failed_jobs.txt``, written and read by this class only."""

    time: float  # unix time of the failure
    job: int | str  # Hydra's job number
    overrides: list[str]  # the job's overrides, as Hydra gives them
    message: str  # the one paragraph the job printed

    def line(self) -> str:
        """The job as it reads in the sweep's summary: ``job N (overrides): message``."""
        return f"job {self.job} ({' '.join(self.overrides)}): {self.message}"


def record_failed_job(sweep_dir: Path, job: int | str, overrides: list[str], message: str) -> FailedJob:
    """Append a `FailedJob` to ``sweep_dir``'s record and return it."""
    record = FailedJob(time.time(), job, [str(o) for o in overrides], message.replace("\n", " "))
    with open(Path(sweep_dir) / FAILED_JOBS, "a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(record)) + "\n")
    return record


# The plain-text record written before the JSON lines ("<unix time> job <n> (<overrides>):
# <message>"): still read, so a sweep folder of an older regdrop keeps its failures.
_OLD_LINE = re.compile(r"^(\d+(?:\.\d*)?) job (\S+) \((.*?)\): (.*)$")


def read_failed_jobs(sweep_dir: Path) -> tuple[list[FailedJob], int]:
    """The sweep's failed jobs, oldest first, and the number of lines that are neither a
    record nor an older regdrop's line (torn, or not written by regdrop): counted, not fatal."""
    path = Path(sweep_dir) / FAILED_JOBS
    if not path.exists():
        return [], 0
    records, unreadable = [], 0
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        record = _parse_failed_job(text)
        if record is None:
            unreadable += bool(text.strip())
        else:
            records.append(record)
    return records, unreadable


def _parse_failed_job(text: str) -> FailedJob | None:
    try:
        fields = json.loads(text)
        record = FailedJob(float(fields["time"]), fields["job"], [str(o) for o in fields["overrides"]],
                           str(fields["message"]))
        return record if isinstance(fields["overrides"], list) else None
    except (ValueError, TypeError, KeyError):
        old = _OLD_LINE.match(text)
        if old is None:
            return None
        return FailedJob(float(old.group(1)), old.group(2), old.group(3).split(), old.group(4))
