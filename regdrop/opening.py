"""What a run does with its folder when it opens it, and the files regdrop reads back from it
(their names, and the statuses, are `regdrop.runfolder`'s).

A run's identity (`regdrop.identity`) is a signature: its choices of config options and the
keys that differ from their defaults, minus the keys outside a result
(`regdrop.runfolder.OUTSIDE_RESULT`: the device, workers, progress bar, logging, paths,
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
* a run of this config whose stored config (``.hydra/config.yaml``) holds another value
  for some key (a default changed by an upgrade of regdrop or of its config tree): a
  `ConfigError` naming the key, the old and the new value and the ways forward (pin the old
  value on the command line, or ``trainer.rerun=true``), nothing touched. A key the stored
  config lacks (added since, with its default) is not a difference: the run is reused;
* an empty folder, next to a folder of the former naming (`regdrop.identity.legacy_hash`,
  the hash of the whole config) that holds this very config: that folder's files move
  here (a note is left there), and the run goes on as above;
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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regdrop.checkpoint import load_checkpoint
from regdrop.errors import ConfigError, RunFileError, read_error
from regdrop.identity import config_hash, flatten, identity, legacy_hash
from regdrop.runfolder import (
    CHECKPOINT,
    CONFIG,
    CONFIG_DIR,
    ENVIRONMENT,
    LOCK,
    METRICS_LOG,
    OVERRIDES,
    PREVIOUS,
    RESULT_FILES,
    SUMMARY,
    RunStatus,
)

_HELD: dict[str, Any] = {}  # run folders this process holds (path -> locked file)
FRESH, RESUME, FINISHED = "fresh", "resume", RunStatus.FINISHED.value  # what a run does with its folder
MOVED_NOTE = "MOVED.txt"  # left in a folder of the former naming whose run moved to the new one


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
        self.values = flatten(identity(cfg))  # what the stored config is checked against
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
        if decision.action != FINISHED:  # a finished run's folder is read-only
            remove_stale_temporaries(self.path)
        return decision

    def _decide(self, resume: str | None, rerun: bool) -> Decision:
        fresh = not any((self.path / f).exists() for f in (CONFIG, METRICS_LOG, CHECKPOINT))
        if fresh and self.path.name == self.hash:  # a folder named by the identity (not by hand)
            self._take_over_former_folder()
        try:
            stored = self._stored_values()
        except RunFileError:
            if not rerun:
                raise
            stored = self.values  # the user chose to start afresh: every old file moves aside
        used = stored is not None or any((self.path / f).exists() for f in (METRICS_LOG, CHECKPOINT))
        if used and stored is None:
            raise ConfigError("hydra.run.dir", f"{self.path} holds files of another run, not this config's "
                              f"(hash {self.hash}); a run never writes into another's folder. Use a fresh folder.")
        changed = differences(stored, self.values) if stored is not None else []
        if changed and stored_hash(self.path) not in (self.hash, legacy_hash(self.cfg)):
            raise ConfigError("hydra.run.dir", f"{self.path} holds the run of another config (hash "
                              f"{stored_hash(self.path)}), not this config's (hash {self.hash}); a run never "
                              "writes into another's folder. Use a fresh folder.")
        if changed and not rerun:
            raise ConfigError(changed[0][0], changed_defaults_message(self.path, changed))
        explicit = resume not in (None, "auto", "never")
        checkpoint = None
        if explicit:
            checkpoint = Path(resume)
            checkpoint = checkpoint / CHECKPOINT if checkpoint.is_dir() else checkpoint
            if not checkpoint.is_file():
                raise ConfigError("trainer.resume", f"no checkpoint at {resume!r}; give a checkpoint "
                                  "file or a run folder, or auto")
            if not self._same_config(checkpoint):
                raise ConfigError("trainer.resume", f"{checkpoint} is a checkpoint of another config; "
                                  "resume a run with the config it was started with")
        finished = self.path / SUMMARY
        if used and finished.exists() and not rerun:
            summary = _read_summary(finished)
            if explicit and self.path.resolve() in (Path(resume).resolve(), Path(resume).resolve().parent):
                raise ConfigError("trainer.resume", f"{self.path} holds a finished run of this config, and a "
                                  "finished run is read-only (trainer.resume included); trainer.rerun=true "
                                  "runs it again (its files move to previous-<time>/)")
            return Decision(FINISHED, summary=summary)
        if used and rerun:
            archive = self._archive()  # nothing written is lost: the old files move aside
            if checkpoint is not None and checkpoint.resolve().parent == self.path.resolve():
                checkpoint = archive / checkpoint.name
            used, stored = False, None
        if checkpoint is not None:
            if checkpoint.name == PREVIOUS and checkpoint.resolve().parent == self.path.resolve():
                self._set_aside_latest()
            return Decision(RESUME, checkpoint, write_config=stored is None)
        if used and resume != "never" and (self.path / CHECKPOINT).exists():
            load_checkpoint(self.path / CHECKPOINT)  # a damaged one stops here, named, nothing changed
            return Decision(RESUME, self.path / CHECKPOINT)
        if used:
            self._archive()  # a run killed before its first checkpoint: start again, keep its files
        return Decision(FRESH, write_config=True)

    def write_config(self) -> None:
        """The config, the overrides and what else decides the result (environment.json)."""
        hydra = self.path / CONFIG_DIR
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
        (self.path / ENVIRONMENT).write_text(json.dumps(environment(self.hash), indent=2) + "\n")

    def _abandon(self) -> None:
        """A rejected run: release the folder, removing the ``.lock`` (while still held, so
        no other run's) and the folder itself when nothing else is in it."""
        if self._lock is not None and [p.name for p in self.path.iterdir()] == [LOCK]:
            (self.path / LOCK).unlink()
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
        self._lock = open(self.path / LOCK, "a+")  # noqa: SIM115
        _HELD[key] = self._lock
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise ConfigError("hydra.run.dir", f"{self.path} is in use by a running run of this config "
                              "(another process holds it); wait for it or stop it") from None

    def _same_config(self, checkpoint: Path) -> bool:
        """Whether ``checkpoint`` is a run of this config: its identity is this one's (or the
        former naming's), or its folder's stored config is this one up to keys added since."""
        if load_checkpoint(checkpoint).get("config_hash") in (self.hash, legacy_hash(self.cfg)):
            return True
        try:
            stored = stored_values(checkpoint.parent / CONFIG)
        except Exception:  # noqa: BLE001 - no readable config beside it: not known to be ours
            return False
        return stored is not None and not differences(stored, self.values)

    def _take_over_former_folder(self) -> None:
        """A folder beside this one, named by this config's former identity (the former
        naming, `legacy_hash`, or an identity that moved when a default did), that holds
        this config's run: its files move here, and a note there says where they went. A
        folder named by hand is never taken; nor is a live run's."""
        if not self.path.parent.is_dir():
            return
        named = {legacy_hash(self.cfg)}
        for other in sorted(self.path.parent.iterdir(), key=lambda p: -p.stat().st_mtime):
            if other == self.path or other.name not in named | {stored_hash(other)}:
                continue
            try:
                stored = stored_values(other / CONFIG)
            except Exception:  # noqa: BLE001 - another run's unreadable config: not ours to judge
                continue
            if stored is None or differences(stored, self.values):
                continue
            with open(other / LOCK, "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # running now: it stays where it is
                for entry in other.iterdir():
                    if entry.name not in (LOCK, MOVED_NOTE) and not (self.path / entry.name).exists():
                        shutil.move(str(entry), str(self.path / entry.name))
                (other / MOVED_NOTE).write_text(f"This run moved to {self.path} (its name is now the hash of "
                                                "the config's change from the defaults).\n")
            print(f"regdrop: {other} holds this config's run under its former name; its files moved to "
                  f"{self.path}", file=sys.stderr)
            return

    def _stored_values(self) -> dict[str, Any] | None:
        stored = self.path / CONFIG
        try:
            return stored_values(stored)
        except Exception as err:  # noqa: BLE001 - torn YAML, garbage, a config of nothing regdrop knows
            raise RunFileError(stored, f"cannot be read as the run's config ({read_error(err)}), so the "
                               "folder's run cannot be told from another config's", [
                                   f"restore the file (its run's overrides are in {OVERRIDES})",
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


def stored_hash(folder: Path) -> str | None:
    """The identity a folder's run was written with (its ``environment.json``), if readable."""
    try:
        return str(json.loads((folder / ENVIRONMENT).read_text())["config_hash"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def stored_values(path: Path) -> dict[str, Any] | None:
    """The stored config at ``path`` as `identity` keys and values (flat); None when there is
    none. Raises what reading or resolving it raises."""
    if not path.exists():
        return None
    return flatten(identity(OmegaConf.load(path)))


_ABSENT = "(no such key)"


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) of each key of the stored config that the current
    one sets otherwise or no longer has. A key only the current config has was added since,
    with its default: taken as the old behaviour, not a difference."""
    return [(key, value, current.get(key, _ABSENT)) for key, value in sorted(stored.items())
            if key not in current or current[key] != value]


def changed_defaults_message(path: Path, changed: list[tuple[str, Any, Any]]) -> str:
    """The refusal of a run whose stored config differs from the config of today's command:
    the keys, the old and the new values, the two ways forward."""
    listed = "; ".join(f"{key} was {old!r}, is now {new!r}" for key, old, new in changed)
    pins = " ".join(f"{key}={_override_value(old)}" for key, old, _ in changed)
    return (f"{path} holds a run of this command made when the config said otherwise ({listed}): a "
            "default changed since (an upgrade of regdrop or of its config files), and the run is "
            f"neither reused nor trained again silently. Nothing was changed. Either pin the old value "
            f"on the command line ({pins}), which finds this run again and reuses it, or run it again "
            "with the new value: trainer.rerun=true (its files move to previous-<time>/).")


def _override_value(value: Any) -> str:
    """A value as it is written in a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


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
