"""Stop cleanly when asked to: SIGTERM, SIGUSR1, SIGUSR2 and Ctrl-C become a request that
the training loop honours at the next optimizer-step boundary (checkpoint, finish wandb as
preempted, exit with a status that says so), never a half-written file or a traceback.
Under data parallelism the ranks agree on it at the next log flush (every
``trainer.log_every`` steps, in the all-reduce the log makes anyway): every rank stops at
the same step boundary, and no step pays a collective for it.

* SIGTERM (``kill``, ``timeout``, ``docker stop``, SLURM) and SIGUSR1: exit status
  `PREEMPTED` (3) after the checkpoint; running the same command again resumes.
* Ctrl-C (SIGINT): the same, with status `INTERRUPTED` (130). A second Ctrl-C while the
  checkpoint is being written waits for it (`critical_section`) and says so; at any other
  moment it stops at once, without a traceback, saying that the steps since the last
  checkpoint are abandoned (the same command resumes from that checkpoint).
* SIGHUP (the terminal closed) is treated like SIGTERM when the run has a terminal, so a
  closed terminal leaves a resumable run; under ``nohup`` (SIGHUP ignored) it stays ignored.
* SIGUSR2 and any signal for which another handler was installed before (submitit's, under
  SLURM: it requeues the job on its timeout / preemption signal): the checkpoint is written
  first, then that handler runs, so the requeued job finds the checkpoint and resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType

from regdrop.runfolder import RunStatus

PREEMPTED = 3
INTERRUPTED = 130
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
_WRITING = [0]  # checkpoint writes under way in this process (`critical_section`)


class Preempted(SystemExit):
    """The run stopped on request after writing its checkpoint (a clean exit)."""


class Abandoned(SystemExit):
    """A second Ctrl-C outside a checkpoint write: stopped at once, the last checkpoint kept."""

    run_status = RunStatus.INTERRUPTED


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """A checkpoint write: a second Ctrl-C waits for its end instead of tearing it."""
    _WRITING[0] += 1
    try:
        yield
    finally:
        _WRITING[0] -= 1


def _say(message: str) -> None:
    """A line on stderr, safe inside a signal handler and with the terminal gone."""
    with contextlib.suppress(OSError):  # a closed terminal (SIGHUP): nobody is there to read it
        os.write(2, (message + "\n").encode())


def _has_terminal() -> bool:
    return any(os.isatty(fd) for fd in (0, 1, 2))


class Preemption:
    """A context manager that turns stop signals into `requested`, checked by the loop."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Callable | int | None] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> Preemption:
        for name in (*SIGNALS, "SIGHUP") if _has_terminal() else SIGNALS:
            number = getattr(signal, name, None)
            if number is None or (name == "SIGHUP" and signal.getsignal(number) is signal.SIG_IGN):
                continue  # no such signal here, or nohup asked to ignore hang-ups
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
        if number == signal.SIGINT and self.signal == signal.SIGINT:  # a second Ctrl-C
            if _WRITING[0]:
                _say("regdrop: the checkpoint is being written; stopping as soon as it is written")
                return
            _say("regdrop: stopped on a second Ctrl-C, abandoning the steps since the last checkpoint; "
                 f"run the same command again to resume from it (exit status {INTERRUPTED})")
            raise Abandoned(INTERRUPTED)
        self.signal = number

    def stop(self) -> None:
        """After the checkpoint: hand over to an earlier handler (submitit's requeue), or exit.

        Under data parallelism a rank that received no signal stops too, at the same step
        as the rank that did (they agree at a log flush), with the status `PREEMPTED`."""
        number = self.signal
        previous = self._previous.get(number)
        self.__exit__()
        if number is None:
            _say("regdrop: stopped with the run's other processes, one of which was asked to stop, "
                 f"after writing the checkpoint; run the same command again to resume (exit status {PREEMPTED})")
            raise Preempted(PREEMPTED)
        if callable(previous) and number != signal.SIGINT:
            previous(number, None)
        name = signal.Signals(number).name
        code = INTERRUPTED if number == signal.SIGINT else PREEMPTED
        _say(f"regdrop: stopped on {name} after writing the checkpoint; run the same command "
             f"again to resume (exit status {code})")
        raise Preempted(code)
