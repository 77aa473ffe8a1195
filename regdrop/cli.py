"""What `train.py`'s Hydra entry point runs: `regdrop.train.train`, with errors reported plainly,
and regdrop's own ``--help``.

A bad config value stops the run with one paragraph naming the key and what is valid (exit
status 2), never a traceback; so do a damaged file of the run folder (named, with the ways
forward) and a disk or permission fault while the run writes (the path and the errno). In a multirun the failing job is marked failed and the other
jobs go on; when the sweep ends Hydra reports the failed job and exits 1.
"""

from __future__ import annotations

import errno
import os
import sys
import textwrap
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from regdrop.errors import DISK_ERRNOS, ConfigError, describe_os_error
from regdrop.runfolder import (
    CHECKPOINT,
    FAILED_JOBS,
    SWEEP_CONFIG,
    read_failed_jobs,
    record_failed_job,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("data", "model", "dropout", "schedule", "optim", "lr", "trainer", "logger", "experiment",
          "hparams_search", "diagnostics")


def run(cfg: DictConfig) -> float | None:
    """Train ``cfg``; return the metric sweepers optimise (``optimized_metric``).

    A `ConfigError` is one paragraph on stderr and exit status 2 (single run), or, in a
    multirun, a failed job (the others go on) reported without a traceback: the sweep ends
    with one line per failed job and exit status 1. A run whose loss stopped being finite
    exits with status 4. A run folder created for a rejected config is removed again.
    """
    from regdrop.train import Diverged, train  # imported here so `--help` and `--cfg` stay fast

    _STARTED.append(True)
    try:
        metrics = train(cfg)
    except (ConfigError, Diverged, OSError) as err:
        if isinstance(err, OSError) and err.errno not in DISK_ERRNOS:
            raise
        if isinstance(err, OSError):  # a full disk, a read-only folder, a path that is a file
            text = describe_os_error(err, Path(cfg.paths.output_dir) / CHECKPOINT)
            err = ConfigError("hydra.run.dir", text)
            message = textwrap.fill(f"regdrop: {text}", width=100, break_on_hyphens=False, break_long_words=False)
        else:
            what = "error in" if isinstance(err, ConfigError) else "stopped:"
            message = textwrap.fill(f"regdrop: {what} {err}", width=100, break_on_hyphens=False, break_long_words=False)
        print(message, file=sys.stderr)
        if isinstance(err, ConfigError):
            _remove_if_empty(Path(cfg.paths.output_dir))
        if _multirun():
            raise JobFailed(HydraConfig.get(), message) from None
        sys.exit(2 if isinstance(err, ConfigError) else 4)
    return metrics[cfg.optimized_metric]  # validate() made sure the run returns it


_STARTED: list[bool] = []


def jobs_started() -> bool:
    """Whether Hydra got as far as running a job in this process."""
    return bool(_STARTED)


class JobFailed(CompactHydraException):
    """A multirun job that failed cleanly. Hydra prints a compact exception without a
    traceback; this one prints every failed job of the sweep, one line each."""

    def __init__(self, hydra_cfg, message: str) -> None:
        self.sweep_dir = Path(hydra_cfg.sweep.dir)
        record_failed_job(self.sweep_dir, hydra_cfg.job.num, list(hydra_cfg.overrides.task),
                          message.removeprefix("regdrop: "))
        super().__init__(message)

    def __str__(self) -> str:
        # Read when Hydra prints it, after every job of the sweep has run.
        launched = self.sweep_dir / SWEEP_CONFIG
        since = launched.stat().st_mtime - 1 if launched.exists() else 0  # this launch's jobs only
        records, unreadable = read_failed_jobs(self.sweep_dir)  # a torn or foreign line: counted
        lines = [record.line() for record in records if record.time >= since]
        damaged = (f"\n  ({unreadable} unreadable line(s) in {self.sweep_dir / FAILED_JOBS}: not written "
                   "by regdrop or torn; delete the file to start the record afresh)") if unreadable else ""
        return (f"regdrop: {len(lines)} job(s) of the sweep failed:\n" + "\n".join(f"  {line}" for line in lines)
                + damaged)

    def __reduce__(self):  # joblib / submitit send it back to the sweeping process
        return (_rebuild_job_failed, (str(self.sweep_dir), self.args[0]))



class RunFolderCheck(Callback):
    """Hydra makes the run (or sweep) folder before regdrop's task runs: a folder that
    cannot be made there (a path that is a file, a read-only or unwritable file system)
    is one paragraph naming the path and the errno, exit status 2, instead of Hydra's
    traceback. Registered in conf/hydra/default.yaml."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_folder(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_folder(config, "hydra.sweep.dir")


def _check_folder(config: DictConfig, key: str) -> None:
    from omegaconf import OmegaConf

    try:
        HydraConfig.instance().set_config(config)  # what ${hydra:...} in the folder's name reads
        folder = Path(str(OmegaConf.select(config, key, throw_on_missing=True))).absolute()
    except Exception:  # noqa: BLE001 - a folder name that does not resolve: Hydra reports it
        return
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        code = errno.EEXIST if existing == folder else errno.ENOTDIR
        fault = OSError(code, os.strerror(code), str(existing))
    elif not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
        fault = OSError(code, os.strerror(code), str(existing))
    else:
        return
    print(textwrap.fill(f"regdrop: {key}={folder}: " + describe_os_error(fault), width=100, break_on_hyphens=False, break_long_words=False), file=sys.stderr)
    sys.exit(2)


def _rebuild_job_failed(sweep_dir: str, message: str) -> JobFailed:
    err = JobFailed.__new__(JobFailed)
    CompactHydraException.__init__(err, message)
    err.sweep_dir = Path(sweep_dir)
    return err


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _remove_if_empty(folder: Path) -> None:
    """Hydra creates the run folder before the task runs: a rejected config leaves none."""
    for path in (folder, folder.parent):
        try:
            path.rmdir()  # only succeeds when empty
        except OSError:
            return


def help_text(conf: Path = CONF) -> str:
    """``python train.py --help``: the groups, each option with the first line of its file."""
    lines = [
        "regdrop: experiments with dropout-family regularization (Hydra + PyTorch).",
        "",
        "usage: python train.py [GROUP=OPTION ...] [KEY=VALUE ...]",
        "       python train.py -m GROUP=A,B KEY=1,2     (a sweep: one job per combination)",
        "       python train.py --cfg job [...]          (print the composed config)",
        "       python -m regdrop.report DIR             (a table from a multirun folder)",
        "",
        "Config groups (conf/<group>/<option>.yaml); defaults marked *:",
    ]
    defaults = _defaults(conf / "train.yaml")
    for group in GROUPS:
        folder = conf / group
        if not folder.is_dir():
            continue
        lines.append(f"  {group}:")
        for path in sorted(folder.glob("*.yaml")):
            mark = "*" if defaults.get(group) == path.stem else " "
            lines.append(f"   {mark}{path.stem:<34} {_first_comment(path)}".rstrip())
    lines += [
        "",
        "Any key can be set: e.g. dropout.p=0.3 trainer.epochs=10 seed=1 (see --cfg job).",
        "Full guide: README.md; methods: docs/methods.md; schedules: docs/schedules.md.",
        "Hydra's own flags: python train.py --hydra-help",
    ]
    return "\n".join(lines)


def _defaults(primary: Path) -> dict[str, str]:
    from omegaconf import OmegaConf

    chosen = {}
    for entry in OmegaConf.load(primary).defaults:
        if not isinstance(entry, str):
            for key, value in entry.items():
                chosen[str(key).removeprefix("optional ")] = value
    return chosen


def _first_comment(path: Path) -> str:
    """The first comment line of a config file that says what the option is."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            sentence = text.split(". ")[0].split(": ")[0] if len(text) > 60 else text
            return sentence[:60] + ("..." if len(sentence) > 60 else "")
    return ""
