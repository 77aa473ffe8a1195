"""The one error type regdrop raises for bad input.

`train.py` catches it and prints its message as one paragraph, with no traceback, and
exits with status 2. Every message names the offending config key and what is valid.
"""


class ConfigError(ValueError):
    """A configuration value that regdrop cannot run with."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


def check_keys(section, name: str, valid) -> None:
    """Raise `ConfigError` for the first key of config ``section`` (called ``name``) not in ``valid``.

    Hydra rejects unknown keys given on the command line; this catches the ones an
    experiment file or a typo in a config file brings in, which Hydra merges silently.
    """
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}", f"not a key of {name}; valid: {', '.join(sorted(valid))}")
