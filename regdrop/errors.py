"""The one error type regdrop raises for bad input.

`train.py` catches it and prints its message as one paragraph, with no traceback, and
exits with status 2. Every message names the offending config key and what is valid.
"""


class ConfigError(ValueError):
    """A configuration value that regdrop cannot run with."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")
