"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM.

The first signal only asks: the loop finishes its step, saves last.pt and the plot,
and raises TrainingInterrupted, which the command turns into a resume hint and
exit status 130. A second signal raises KeyboardInterrupt at once.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; last.pt (resumable) and loss.png were saved."""

    def __init__(self, signame: str, step: int, elapsed_s: float, budget_s: float | None):
        super().__init__(f"{signame} at step {step}")
        self.signame, self.step, self.elapsed_s, self.budget_s = signame, step, elapsed_s, budget_s


class StopRequest:
    """Set by the first SIGINT/SIGTERM; a second one raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signame = ""

    def __bool__(self) -> bool:
        return bool(self.signame)

    def handle(self, signum, _frame) -> None:
        if self.signame:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name
        log.warning("%s: stopping after this step (again to stop at once)", self.signame)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM set the yielded request while the block runs (main thread only)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield stop
        return
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
