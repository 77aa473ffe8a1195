"""The one error type regdrop raises for bad input.

`train.py` catches it and prints its message as one paragraph, with no traceback, and
exits with status 2. Every message names the offending config key and what is valid.
"""


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
