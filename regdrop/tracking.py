"""Where a run's numbers and words go: files in the run folder, wandb, and the console.

`RunTracker` is a context manager around a run. Inside it the run folder holds:

* ``metrics.jsonl``: one JSON line per optimizer step and one per evaluation, flushed as
  written, so a killed run keeps every step it logged;
* ``metrics.json``: the final summary, written when the run ends well;
* ``train.log``: everything the run printed (`RunTracker.print`);
* ``run.json``: the run's status (``running``, ``finished``, ``failed``, ``preempted``,
  ``interrupted``, ``diverged``), process id, host and times, so a reader can tell a
  finished run from a killed one (``running`` with a dead process).

A resumed run cuts ``metrics.jsonl`` back to what its checkpoint covers (so every step
appears once) and continues its wandb run (same id). When the file holds less than the
checkpoint covers (its tail lost in a crash), every whole line is kept, a torn last line is
cut back to the last newline, and the lost steps are marked: a warning naming the file and
the steps, a ``{"gap": {"from_step": a, "to_step": b}, ...}`` record in the file and
``metrics_gaps`` in ``metrics.json``. The file only ever holds whole JSON lines. A line
that is not JSON in what the checkpoint covers is a `RunFileError` (nothing is changed).
``run.json`` and ``metrics.json`` are replaced atomically; a run that fails (a full disk,
say) says ``failed`` in ``run.json`` with the reason, when the disk still lets it. Under data parallelism only rank 0
writes (``enabled=False`` elsewhere). A failing logger (the wandb service dying) is a
warning, never the end of the run: the metrics files are written whatever happens to it.

wandb runs offline by default (no account, no network) inside the run folder;
``WANDB_MODE`` in the environment wins over ``logger.mode``. Each Hydra job gets its own
wandb run, finished when the job ends, even when several jobs of a multirun share one
process.

`StepLog` keeps each step's loss and accuracy on the device and reads them in one go every
``trainer.log_every`` steps: between two reads the training loop never waits for the device.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, OmegaConf

from regdrop.errors import ConfigError, RunFileError, check_keys, read_error
from regdrop.runfolder import METRICS_LOG, STATUS, SUMMARY, TRAIN_LOG, RunStatus
from regdrop.runtime import Runtime
from regdrop.wandb_log import (
    DERIVED_SUMMARIES,
    check_log_checkpoints,
    define_metrics,
    log_checkpoints,
    method_columns,
    run_labels,
    wandb_record,
)

WANDB_MODES = ("offline", "online", "disabled")
WANDB_KEYS = {"name", "mode", "project", "entity", "group", "run_name", "job_type", "tags", "log_checkpoints"}
LOGGERS = ("wandb", "none")


def check_logger(logger) -> None:
    """Check the config ``logger`` section: name, keys, and the wandb mode in force."""
    if logger.name not in LOGGERS:
        raise ConfigError("logger.name", f"unknown logger {logger.name!r}; valid: {', '.join(LOGGERS)}")
    check_keys(logger, "logger", WANDB_KEYS if logger.name == "wandb" else {"name"})
    if logger.name == "wandb":
        mode = os.environ.get("WANDB_MODE") or logger.mode
        if mode not in WANDB_MODES:
            source = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "logger.mode"
            raise ConfigError(source, f"must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        check_log_checkpoints(logger)


class RunTracker:
    """The run folder's files, wandb, and the console, opened and closed with the run."""

    def __init__(self, output_dir: Path, cfg: DictConfig, *, enabled: bool = True,
                 resumed: dict[str, Any] | None = None) -> None:
        """``resumed``: the checkpoint a resumed run started from (its ``metrics_bytes``,
        ``wandb_run_id`` and step count are what the tracker continues from)."""
        self.output_dir = Path(output_dir)
        self.cfg = cfg
        self.enabled = enabled
        self.wandb_run = None
        self._jsonl = self._log = None
        self._status: dict[str, Any] = {}
        self._checkpoints: dict[str, Path] = {}  # kind -> newest file, for wandb artifacts at the end
        self._last_step: int | None = None
        self._wandb_keys: set[str] = set()  # keys this run logged to wandb's history
        resumed = resumed or {}
        self._metrics_bytes, self._wandb_id = resumed.get("metrics_bytes"), resumed.get("wandb_run_id")
        self._resumed_step = resumed.get("state", {}).get("step", 0)  # optimizer steps it covers
        self.gaps: list[dict[str, int]] = []  # steps lost from metrics.jsonl (a crash lost its tail)

    def __enter__(self) -> RunTracker:
        if not self.enabled:
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.output_dir / METRICS_LOG
        gap = self._cut_metrics(metrics) if self._metrics_bytes is not None else None
        self._jsonl = open(metrics, "a", buffering=1)  # noqa: SIM115
        self._log = open(self.output_dir / TRAIN_LOG, "a", buffering=1)  # noqa: SIM115
        now = _now()
        self._status = {"status": RunStatus.RUNNING, "pid": os.getpid(), "host": socket.gethostname(),
                        "started": now, "updated": now}
        self._write_status()
        if gap is not None:
            self.gaps.append(gap)
            self.warn(f"{metrics} held less than the checkpoint covers ({gap['missing_bytes']} bytes lost, "
                      f"a crash lost its tail): the records of optimizer steps {gap['from_step']} to "
                      f"{gap['to_step']} are missing; every whole line is kept and the gap is marked "
                      "in the file and in metrics.json (metrics_gaps)")
            self._jsonl.write(json.dumps({"gap": {"from_step": gap["from_step"], "to_step": gap["to_step"]},
                                          "missing_bytes": gap["missing_bytes"]}) + "\n")
        if self.cfg.logger.name == "wandb":
            try:
                self.wandb_run = _start_wandb(self.output_dir, self.cfg, self._wandb_id)
            except Exception as err:  # noqa: BLE001 - a logger never stops a run
                self._logger_failed(err)
        return self

    def __exit__(self, kind, err, traceback) -> None:
        if kind is None:
            self.finish(None)
        elif issubclass(kind, KeyboardInterrupt):
            self._close(RunStatus.INTERRUPTED, exit_code=255)
        else:
            reason = None if isinstance(err, SystemExit) else read_error(err)
            self._close(getattr(err, "run_status", RunStatus.FAILED), exit_code=1, reason=reason)

    def _cut_metrics(self, metrics: Path) -> dict[str, int] | None:
        """A resume: cut metrics.jsonl back to what the checkpoint covers (whole lines only).
        Returns the gap when the file holds less than that (its tail lost), else None."""
        covered = self._metrics_bytes
        data = metrics.read_bytes() if metrics.exists() else b""
        kept = data[:covered]
        kept = kept[: kept.rfind(b"\n") + 1]  # whole lines only: a torn last line goes
        records = []
        for number, line in enumerate(kept.splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RunFileError(metrics, f"line {number}, inside what the checkpoint covers, is not a JSON "
                                   f"record ({read_error(err)})", [
                                       f"remove or repair that line of {metrics} and run the same command again",
                                       "start the run afresh with trainer.rerun=true (its files move to "
                                       "previous-<time>/)"]) from None
        self.gaps = [r["gap"] for r in records if isinstance(r, dict) and isinstance(r.get("gap"), dict)]
        if len(kept) != len(data):
            with open(metrics, "r+b") as f:
                f.truncate(len(kept))
        if len(data) >= covered:
            return None
        logged = [r["step"] for r in records if isinstance(r, dict) and "train/loss" in r]
        start = max(logged) + 1 if logged else 0
        return {"from_step": start, "to_step": self._resumed_step - 1, "missing_bytes": covered - len(kept)}

    def metrics_bytes(self) -> int:
        """The length of metrics.jsonl now (a checkpoint covers this much of it)."""
        if self._jsonl is None:
            return 0
        self._jsonl.flush()
        return self._jsonl.tell()

    @property
    def run_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def print(self, message: str) -> None:
        """A line for the user: on the console and in the run folder's ``train.log``."""
        if not self.enabled:
            return
        print(message, flush=True)
        if self._log is not None:
            self._log.write(message + "\n")

    def warn(self, message: str) -> None:
        """A one-line warning: on stderr and in ``train.log``."""
        if not self.enabled:
            return
        print(f"regdrop: warning: {message}", file=sys.stderr, flush=True)
        if self._log is not None:
            self._log.write(f"warning: {message}\n")

    def log(self, record: dict[str, Any], step: int) -> None:
        """One record: a line of metrics.jsonl and a wandb log call at ``step``."""
        if self._jsonl is None:
            return
        try:
            self._jsonl.write(json.dumps(_clean(record)) + "\n")
        except OSError as err:  # a full disk: the error names the file (a write names none)
            err.filename = err.filename or self._jsonl.name
            raise
        self._last_step = step
        self._wandb_keys.update(record)
        self._wandb(lambda run: run.log(wandb_record(record), step=step))

    def heartbeat(self) -> None:
        """Mark the run alive now (``run.json``'s ``updated``)."""
        if self._status:
            self._status["updated"] = _now()
            self._write_status()

    def write_text(self, name: str, text: str) -> Path:
        """A text file in the run folder (the surgery report, say)."""
        path = self.output_dir / name
        if self.enabled:
            path.write_text(text if text.endswith("\n") else text + "\n")
        return path

    def log_config_extra(self, values: dict[str, Any]) -> None:
        """Facts found at run time (surgery report, steps per epoch): into the wandb config;
        the method's options and the world size also as top-level columns (`method_columns`)."""
        if "method_options" in values:
            values = {**values, **method_columns(self.cfg, values["method_options"], values.get("world_size", 1))}
        self._wandb(lambda run: run.config.update(values, allow_val_change=True))

    def log_checkpoint(self, path: Path, kind: str) -> None:
        """A checkpoint was written (``kind``: ``last`` or ``best``); the newest of each kind
        becomes a wandb artifact when the run closes, if ``logger.log_checkpoints`` asks."""
        self._checkpoints[kind] = Path(path)

    def log_image(self, key: str, path: Path, step: int = 0) -> None:
        def log(run):
            import wandb

            run.log({key: wandb.Image(str(path))}, step=step)

        self._wandb(log)

    def finish(self, summary: dict[str, Any] | None) -> None:
        """Write metrics.json (when the run has a summary) and close everything."""
        if self._jsonl is None:
            return
        if summary is not None:
            if self.gaps:  # steps whose records a crash lost: the summary says so
                summary = {**summary, "metrics_gaps": [[g["from_step"], g["to_step"]] for g in self.gaps]}
            text = json.dumps(_clean(summary), indent=2)
            write_atomically(self.output_dir / SUMMARY, lambda f: f.write(text.encode()))

            def record(run):
                for key, value in summary.items():
                    if key not in DERIVED_SUMMARIES or key not in self._wandb_keys:  # else wandb's max/last
                        run.summary[key] = value

            self._wandb(record)
        self._close(RunStatus.FINISHED, exit_code=0)

    def preempted(self, status: str = RunStatus.PREEMPTED) -> None:
        """Close as stopped on request: wandb marked preempting, ``run.json`` says so."""
        self._wandb(lambda run: run.mark_preempting())
        self._close(status, exit_code=0)

    def _wandb(self, call) -> None:
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as err:  # noqa: BLE001 - a logger never stops a run
            self._logger_failed(err)

    def _logger_failed(self, err: Exception) -> None:
        self.wandb_run = None
        self.warn(f"wandb failed ({type(err).__name__}: {err}); training goes on, metrics go to "
                  "metrics.jsonl and metrics.json only")

    def _close(self, status: str, exit_code: int, reason: str | None = None) -> None:
        """Close the files and wandb; ``run.json`` gets ``status`` (and ``reason``). Each step
        goes on when one before it fails (a full disk): the run's own error is the one shown."""
        if self._jsonl is None:
            return
        with contextlib.suppress(OSError):
            self._jsonl.close()
        self._jsonl = None
        self._wandb(lambda run: log_checkpoints(run, self.cfg, self._checkpoints, self._last_step))
        run, self.wandb_run = self.wandb_run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as err:  # noqa: BLE001
                self.warn(f"wandb could not finish its run ({type(err).__name__}: {err})")
        self._status.update(status=status, updated=_now(), **({"reason": reason} if reason else {}))
        with contextlib.suppress(OSError):  # a full or read-only disk: the error says it already
            self._write_status()
        with contextlib.suppress(OSError):
            self._log.close()
        self._log = None

    def _write_status(self) -> None:
        text = json.dumps(self._status, indent=2) + "\n"
        write_atomically(self.output_dir / STATUS, lambda f: f.write(text.encode()), durable=False)


@dataclass
class StepValues:
    """What one flush of `StepLog` read: per-step values, on the host."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    seconds: float = 0.0  # wall time of these steps, the wait for the device included
    stop: bool = False  # a stop was asked for (on any rank, under data parallelism)


class StepLog:
    """Per-step records held on the device and written every ``every`` steps.

    `add` keeps the step's loss and correct count as device tensors (no sync); `flush`
    reads all of them with one host transfer, writes one metrics.jsonl record per step
    (``step``, ``epoch``, ``train/loss``, ``train/acc``, ``lr``, ``train/drop_rate``,
    ``samples_per_s``: the throughput of the flushed window) and returns the values.
    Under data parallelism (``all_reduce_sum``: a sum over the ranks, in place) the values
    are the global batch's: the mean loss over ranks, the correct and sample counts summed.
    A flush is also where the ranks agree to stop (`flush`'s ``stop``): the flag rides in
    the same all-reduce, so a training step itself issues no collective and no host sync.
    """

    def __init__(self, tracker: RunTracker, every: int, runtime: Runtime | None = None) -> None:
        self.tracker, self.every = tracker, every
        self.runtime = runtime or Runtime(torch.device("cpu"), None)
        self.world_size = self.runtime.world_size
        self._pending: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, int]] = []
        self._window_start = time.perf_counter()

    def start_window(self) -> None:
        """Start timing here (after an evaluation, say, which is not training time)."""
        self._window_start = time.perf_counter()

    def add(self, record: dict[str, Any], loss: torch.Tensor, correct: torch.Tensor, samples: int) -> bool:
        """Hold one step's values; True when it is time to `flush`."""
        self._pending.append((record, loss.detach(), correct.detach(), samples))
        return len(self._pending) >= self.every

    def flush(self, stop: bool = False) -> StepValues:
        """Write the held steps; ``stop``: this rank was asked to stop. Under data
        parallelism every rank must flush at the same steps: ``values.stop`` is then True
        on every rank when any asked (a sum of 0/1 flags, i.e. their maximum, in the
        window's one all-reduce)."""
        values = StepValues(stop=stop)
        distributed = self.runtime.distributed
        if not self._pending and not distributed:
            return values
        rows = [torch.stack([loss.float(), correct.float()]) for _, loss, correct, _ in self._pending]
        flag = torch.tensor([float(stop), 0.0], device=self.runtime.device)
        stacked = torch.stack([*rows, flag])  # the last row: the stop flag
        if distributed:
            self.runtime.all_reduce_sum(stacked)
            stacked[:, 0] /= self.world_size
        *read, (agreed, _) = stacked.tolist()  # the one host read of the window
        values.stop = agreed > 0
        if not self._pending:
            return values
        values.seconds = time.perf_counter() - self._window_start
        throughput = sum(s for *_, s in self._pending) * self.world_size / max(values.seconds, 1e-9)
        for (record, _, _, samples), (loss, correct) in zip(self._pending, read, strict=True):
            correct, samples = round(correct), samples * self.world_size
            self.tracker.log({**record, "train/loss": loss, "train/acc": correct / samples,
                              "samples_per_s": throughput}, step=record["step"])
            values.steps.append(record["step"])
            values.losses.append(loss)
            values.correct.append(correct)
            values.samples.append(samples)
        self._pending.clear()
        self.tracker.heartbeat()
        self.start_window()
        return values


def _start_wandb(output_dir: Path, cfg: DictConfig, run_id: str | None = None):
    """The run's wandb run (offline by default), grouped, named and tagged as
    `regdrop.wandb_log` says, with the table's metrics declared."""
    import wandb

    logger = cfg.logger
    labels = run_labels(cfg)
    run = wandb.init(
        id=run_id,
        resume="allow" if run_id else None,
        project=logger.project,
        entity=logger.entity,
        group=labels.group,
        name=labels.name,
        job_type=labels.job_type,
        tags=labels.tags,
        config={**OmegaConf.to_container(cfg, resolve=True), **labels.columns},
        dir=str(output_dir),
        mode=os.environ.get("WANDB_MODE") or logger.mode,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )
    define_metrics(run)
    return run


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.<name>.<pid>.tmp``
    (the process id tells a stale one, of a dead process, from a live one's)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(path: Path, write: Callable[[IO[bytes]], object], durable: bool = True) -> None:
    """``write(file)`` to a temporary file, flush, fsync, rename over ``path``, fsync the
    folder: a crash leaves the old file or the new one. A failed write (a full disk)
    removes its temporary file and raises. ``durable=False`` skips the fsyncs (a status
    rewritten every few steps, where the latest version surviving a power cut is no need)."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)  # a failed write names no file: say which one
        raise
    if not durable:
        return
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe values: NaN and infinities become None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}

