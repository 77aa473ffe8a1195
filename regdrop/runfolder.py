"""A run's folder: what a run does with it, and the files regdrop reads back from it.

A run's identity (`regdrop.identity`) is a hash of its resolved config minus the keys that only say where or
how fast it runs (`RUNTIME_KEYS`: the device, workers, progress bar, logging, paths,
resume flags...). Hydra's run folder is named after it (``<experiment or data-model-method>
/<hash>``, through the ``regdrop_run`` resolver), so every rank of a torchrun job, and
every re-launch of the same command, lands in the same folder, and a different config
never lands in a used one.

`RunFolder.open` decides what a run does with its folder:

* empty: a fresh run; the config (``.hydra/config.yaml``, ``overrides.yaml``,
  ``hydra.yaml``) and ``environment.json`` (git commit, dirty tree, library versions) are
  written, after validation, so a rejected config writes nothing (a rejected run leaves
  no folder behind: not even its ``.lock``);
* a checkpoint there (or ``trainer.resume=PATH``): the run resumes from it (a run resumed
  into a fresh folder from another folder's checkpoint writes its config there too);
* a finished run of the same config: reported and not rerun, and read-only to every path,
  ``trainer.resume`` included (``trainer.rerun=true`` moves its files to
  ``previous-<time>/`` and runs again; so it does for an unfinished run, which then starts
  afresh);
* another config's run, or a live run of this one: a `ConfigError`, nothing touched;
* a damaged file regdrop reads back (``.hydra/config.yaml``, ``metrics.json``, the
  checkpoint): a `RunFileError` naming it and the ways forward, nothing touched.

Opening a folder also removes the temporary files (``.<name>.<pid>.tmp``) that a process
killed while writing left behind; a live process's are kept.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regdrop.checkpoint import CHECKPOINT, PREVIOUS, load_checkpoint
from regdrop.errors import ConfigError, RunFileError, read_error

# The identity lives in its own module (no run-folder I/O); named here too for the callers.
from regdrop.identity import RUNTIME_KEYS as RUNTIME_KEYS
from regdrop.identity import config_hash as config_hash
from regdrop.identity import identity as identity
from regdrop.identity import register_resolvers as register_resolvers
from regdrop.identity import run_name as run_name
from regdrop.identity import sweep_name as sweep_name

_HELD: dict[str, Any] = {}  # run folders this process holds (path -> locked file)
RESULT_FILES = ("metrics.json", "metrics.jsonl", "run.json", CHECKPOINT, PREVIOUS, "best.pt", "surgery.txt",
                "train.log", "drop_schedule.png", "environment.json", ".hydra", "wandb")


@dataclass
class Decision:
    """What a run does with its folder: ``fresh``, ``resume`` (from ``checkpoint``) or
    ``finished`` (with the ``summary`` it already has); ``write_config``: the folder has no
    config yet (a fresh run, or a resume from another folder's checkpoint)."""

    action: str
    checkpoint: Path | None = None
    summary: dict[str, Any] | None = None
    write_config: bool = False


class RunFolder:
    """The run folder of one config, held (a lock) while the run is in it."""

    def __init__(self, path: Path, cfg: DictConfig) -> None:
        self.path, self.cfg, self.hash = Path(path), cfg, config_hash(cfg)
        self._lock = None

    def open(self, resume: str | None, rerun: bool) -> Decision:
        """Claim the folder and decide (module doc); raises `ConfigError` if it is not ours
        and `RunFileError` if a file it reads back is damaged. A rejected run leaves the
        folder as it found it (and no folder at all where there was none)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._claim()
        try:
            decision = self._decide(resume, rerun)
        except ConfigError:
            self._abandon()
            raise
        if decision.action != "finished":  # a finished run's folder is read-only
            remove_stale_temporaries(self.path)
        return decision

    def _decide(self, resume: str | None, rerun: bool) -> Decision:
        try:
            stored = self._stored_hash()
        except RunFileError:
            if not rerun:
                raise
            stored = self.hash  # the user chose to start afresh: every old file moves aside
        used = stored is not None or any((self.path / f).exists() for f in ("metrics.jsonl", CHECKPOINT))
        if used and stored != self.hash:
            what = f"the run of another config (hash {stored})" if stored else "files of another run"
            raise ConfigError("hydra.run.dir", f"{self.path} holds {what}, not this config's (hash "
                              f"{self.hash}); a run never writes into another's folder. Use a fresh folder.")
        explicit = resume not in (None, "auto", "never")
        checkpoint = None
        if explicit:
            checkpoint = Path(resume)
            checkpoint = checkpoint / CHECKPOINT if checkpoint.is_dir() else checkpoint
            if not checkpoint.is_file():
                raise ConfigError("trainer.resume", f"no checkpoint at {resume!r}; give a checkpoint "
                                  "file or a run folder, or auto")
            if load_checkpoint(checkpoint).get("config_hash") != self.hash:
                raise ConfigError("trainer.resume", f"{checkpoint} is a checkpoint of another config; "
                                  "resume a run with the config it was started with")
        finished = self.path / "metrics.json"
        if used and finished.exists() and not rerun:
            summary = _read_summary(finished)
            if explicit and self.path.resolve() in (Path(resume).resolve(), Path(resume).resolve().parent):
                raise ConfigError("trainer.resume", f"{self.path} holds a finished run of this config, and a "
                                  "finished run is read-only (trainer.resume included); trainer.rerun=true "
                                  "runs it again (its files move to previous-<time>/)")
            return Decision("finished", summary=summary)
        if used and rerun:
            archive = self._archive()  # nothing written is lost: the old files move aside
            if checkpoint is not None and checkpoint.resolve().parent == self.path.resolve():
                checkpoint = archive / checkpoint.name
            used, stored = False, None
        if checkpoint is not None:
            if checkpoint.name == PREVIOUS and checkpoint.resolve().parent == self.path.resolve():
                self._set_aside_latest()
            return Decision("resume", checkpoint, write_config=stored is None)
        if used and resume != "never" and (self.path / CHECKPOINT).exists():
            load_checkpoint(self.path / CHECKPOINT)  # a damaged one stops here, named, nothing changed
            return Decision("resume", self.path / CHECKPOINT)
        if used:
            self._archive()  # a run killed before its first checkpoint: start again, keep its files
        return Decision("fresh", write_config=True)

    def write_config(self) -> None:
        """The config, the overrides and what else decides the result (environment.json)."""
        hydra = self.path / ".hydra"
        hydra.mkdir(exist_ok=True)
        OmegaConf.save(self.cfg, hydra / "config.yaml")
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), hydra / "overrides.yaml")
                OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), hydra / "hydra.yaml")
        except ValueError:
            pass
        if not (hydra / "overrides.yaml").exists():
            OmegaConf.save(OmegaConf.create([]), hydra / "overrides.yaml")
        (self.path / "environment.json").write_text(json.dumps(environment(self.hash), indent=2) + "\n")

    def _abandon(self) -> None:
        """A rejected run: release the folder, removing the ``.lock`` (while still held, so
        no other run's) and the folder itself when nothing else is in it."""
        if self._lock is not None and [p.name for p in self.path.iterdir()] == [".lock"]:
            (self.path / ".lock").unlink()
        self.release()
        with contextlib.suppress(OSError):
            self.path.rmdir()  # only succeeds when empty

    def _set_aside_latest(self) -> None:
        """A resume from ``checkpoint.prev.pt``: the latest checkpoint (damaged, or not the
        one chosen) moves aside, so rotating the next one in does not replace the previous."""
        latest = self.path / CHECKPOINT
        if latest.exists():
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            latest.rename(self.path / f"checkpoint.set-aside-{stamp}.pt")

    def release(self) -> None:
        if self._lock is not None:
            _HELD.pop(str(self.path.resolve()), None)
            self._lock.close()
            self._lock = None

    def _claim(self) -> None:
        key = str(self.path.resolve())
        if key in _HELD:  # this process held it in a run that ended with an error: take it back
            _HELD.pop(key).close()
        self._lock = open(self.path / ".lock", "a+")  # noqa: SIM115
        _HELD[key] = self._lock
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise ConfigError("hydra.run.dir", f"{self.path} is in use by a running run of this config "
                              "(another process holds it); wait for it or stop it") from None

    def _stored_hash(self) -> str | None:
        stored = self.path / ".hydra" / "config.yaml"
        if not stored.exists():
            return None
        try:
            saved = OmegaConf.load(stored)
            return config_hash(saved)
        except Exception as err:  # noqa: BLE001 - torn YAML, garbage, a config of nothing regdrop knows
            raise RunFileError(stored, f"cannot be read as the run's config ({read_error(err)}), so the "
                               "folder's run cannot be told from another config's", [
                                   "restore the file (its run's overrides are in .hydra/overrides.yaml)",
                                   "start afresh here with trainer.rerun=true (every file moves to "
                                   "previous-<time>/)",
                                   "or set hydra.run.dir to another folder"]) from None

    def _archive(self) -> Path:
        """Move a previous attempt's files aside: nothing written is ever lost."""
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        target = self.path / f"previous-{stamp}"
        target.mkdir()
        for name in RESULT_FILES:
            if (self.path / name).exists():
                shutil.move(str(self.path / name), str(target / name))
        return target


def _read_summary(path: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json``; a `RunFileError` when it is torn or garbage."""
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError(f"a JSON {type(summary).__name__}, not the summary's object")
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFileError(path, f"cannot be read as the run's summary ({read_error(err)})", [
            "run it again with trainer.rerun=true (its files move to previous-<time>/)",
            f"or delete {path.name} and run the same command again: the run resumes from its "
            "last checkpoint and writes the summary anew"]) from None
    return summary


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the ``.<name>.<pid>.tmp`` files of processes that are gone (a write killed
    midway); a live process's are kept. Returns the removed paths."""
    removed = []
    for path in folder.glob(".*.tmp"):
        pid = path.name[: -len(".tmp")].rpartition(".")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def environment(config_hash: str) -> dict[str, Any]:
    """What else decides a result: regdrop's commit (and a dirty tree), library versions."""
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "hydra-core", "omegaconf", "wandb", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    root = Path(__file__).resolve().parents[1]
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        if commit:
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"config_hash": config_hash, "git_commit": commit, "git_dirty": dirty, "versions": versions,
            "host": platform.node(), "pid": os.getpid()}
