"""Stop cleanly when asked to: SIGTERM, SIGUSR1, SIGUSR2 and Ctrl-C become a request that
the training loop honours at the next optimizer-step boundary (checkpoint, finish wandb as
preempted, exit with a status that says so), never a half-written file or a traceback.

* SIGTERM (``kill``, ``timeout``, ``docker stop``, SLURM) and SIGUSR1: exit status
  `PREEMPTED` (3) after the checkpoint; running the same command again resumes.
* Ctrl-C (SIGINT): the same, with status `INTERRUPTED` (130); a second Ctrl-C stops at once.
* SIGUSR2 and any signal for which another handler was installed before (submitit's, under
  SLURM: it requeues the job on its timeout / preemption signal): the checkpoint is written
  first, then that handler runs, so the requeued job finds the checkpoint and resumes.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType

PREEMPTED = 3
INTERRUPTED = 130
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


class Preempted(SystemExit):
    """The run stopped on request after writing its checkpoint (a clean exit)."""


class Preemption:
    """A context manager that turns stop signals into `requested`, checked by the loop."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Callable | int | None] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> Preemption:
        for name in SIGNALS:
            number = getattr(signal, name, None)
            if number is None:
                continue
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread (a launcher's worker): leave signals alone
                return self
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if number == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = number

    def stop(self) -> None:
        """After the checkpoint: hand over to an earlier handler (submitit's requeue), or exit."""
        number = self.signal
        previous = self._previous.get(number)
        self.__exit__()
        if callable(previous) and number != signal.SIGINT:
            previous(number, None)
        name = signal.Signals(number).name
        code = INTERRUPTED if number == signal.SIGINT else PREEMPTED
        print(f"regdrop: stopped on {name} after writing the checkpoint; run the same command "
              f"again to resume (exit status {code})", file=sys.stderr, flush=True)
        raise Preempted(code)
