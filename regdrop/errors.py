"""The error types regdrop raises for bad input and for files it cannot read or write.

`train.py` catches them and prints the message as one paragraph, with no traceback, and
exits with status 2. A `ConfigError` names the offending config key and what is valid; a
`RunFileError` names the damaged file, what is wrong with it and the ways forward; a disk
or permission fault (`describe_os_error`) names the path, the errno and what to do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# The faults of the file system a run can meet while it writes (full disk, read-only or
# unwritable folder, a path that is a file): reported as one paragraph, not a traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST,
               errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.EFBIG}


class ConfigError(ValueError):
    """A configuration value that regdrop cannot run with."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


def check_keys(section, name: str | None, valid) -> None:
    """Raise `ConfigError` for the first key of config ``section`` not in ``valid``.

    ``name`` is the section's key (``None`` for the top level of the config). Hydra rejects
    unknown keys given on the command line; this catches the ones an experiment file or a
    typo in a config file brings in, which Hydra merges silently.
    """
    unknown = sorted(set(section) - set(valid))
    if unknown:
        key = unknown[0] if name is None else f"{name}.{unknown[0]}"
        where = "the config" if name is None else name
        raise ConfigError(key, f"not a key of {where}; valid: {', '.join(sorted(valid))}")


def check_number(
    value,
    key: str,
    *,
    integer: bool = False,
    minimum: float | None = None,
    above: float | None = None,
    optional: bool = False,
) -> None:
    """Raise `ConfigError` naming ``key`` unless ``value`` is a number of the right kind.

    ``integer`` asks for an int; ``minimum`` is inclusive, ``above`` exclusive; ``optional``
    allows null. Booleans are never numbers here.
    """
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if minimum is not None:
        kind += f" >= {minimum:g}"
    if above is not None:
        kind += f" > {above:g}"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else int | float)
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and above is not None:
        ok = value > above
    if not ok:
        raise ConfigError(key, f"must be {kind}{' or null' if optional else ''}, got {value!r}")


class RunFileError(ConfigError):
    """A file of a run folder that regdrop reads back and cannot use: truncated, garbage,
    torn JSON or YAML, not a regdrop checkpoint. Nothing is changed until the user picks a
    way forward (``ways``); the message names the file and what is wrong with it."""

    def __init__(self, path: Path | str, problem: str, ways: list[str]) -> None:
        self.path = Path(path)
        forward = "; ".join(ways)
        super().__init__(str(path), f"{problem}. Nothing was changed. Ways forward: {forward}.")


def read_error(err: BaseException) -> str:
    """What a reader's exception says, on one line (the type and the first line)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}{': ' + text[:200] if text else ''}"


def describe_os_error(err: OSError, last_checkpoint: Path | None = None) -> str:
    """One paragraph for a disk or permission fault: the path, the errno and what to do."""
    code = errno.errorcode.get(err.errno, str(err.errno))
    path = err.filename or "a file of the run folder"
    what = os.strerror(err.errno) if err.errno else str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free space on that file system (or set hydra.run.dir to another one)"
    elif err.errno in (errno.EEXIST, errno.ENOTDIR):
        advice = "a run folder is a folder: that path (or one above it) is a file; move it or set hydra.run.dir elsewhere"
    elif err.errno == errno.EISDIR:
        advice = "that path is a folder where a file belongs; move it away"
    else:
        advice = "make it writable (a read-only mount or missing permissions) or set hydra.run.dir to a writable folder"
    if last_checkpoint is not None and last_checkpoint.is_file():
        keep = (f" The last checkpoint, {last_checkpoint}, is intact: run the same command again to resume "
                "from it.")
    else:
        keep = ""
    return f"cannot write {path}: {what} ({code}); {advice}.{keep}"
