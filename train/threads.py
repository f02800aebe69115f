"""Pick the faster torch thread count while training, on a CPU shared with other work.

On a 2-core machine where other processes keep a core busy, two OpenMP threads
can run several times slower than one (a thread that waits at every barrier for
its descheduled partner); on an idle machine two threads win.  The tuner times
real training steps with each candidate count in turn, keeps the fastest, and
probes again every `period` seconds, so the choice follows the machine's load.
No step is wasted: the probes are ordinary training steps.

Thread counts change floating-point reduction order, so a tuned run is not
bit-for-bit reproducible; pass a fixed --threads for that.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def default_candidates() -> list[int]:
    n = os.cpu_count() or 1
    return sorted({1, n})


class ThreadTuner:
    def __init__(self, candidates: Sequence[int] = (), probe_steps: int = 4, period: float = 45.0):
        self.candidates = list(candidates) or default_candidates()
        self.probe_steps = probe_steps
        self.period = period
        self.best = self.candidates[-1]
        self._times: dict[int, list[float]] = {}
        self._probe_index = 0  # the candidate being timed while probing
        self._probing = len(self.candidates) > 1
        self._run_until = 0.0
        self._t_step = 0.0
        torch.set_num_threads(self._current())

    def _current(self) -> int:
        return self.candidates[self._probe_index] if self._probing else self.best

    def start_step(self) -> None:
        if not self._probing and len(self.candidates) > 1 and time.perf_counter() >= self._run_until:
            self._probing, self._probe_index, self._times = True, 0, {}
        n = self._current()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self._t_step = time.perf_counter()

    def end_step(self) -> None:
        if not self._probing:
            return
        n = self._current()
        times = self._times.setdefault(n, [])
        times.append(time.perf_counter() - self._t_step)
        if len(times) < self.probe_steps:
            return
        self._probe_index += 1
        if self._probe_index < len(self.candidates):
            return
        # The first step after a switch warms the thread pool up: judge by the median.
        medians = {k: statistics.median(v) for k, v in self._times.items()}
        best = min(medians, key=medians.get)
        if best != self.best:
            log.info("threads: %d -> %d (median step %s)", self.best, best,
                     ", ".join(f"{k} threads {v * 1000:.0f} ms" for k, v in medians.items()))
        self.best, self._probing = best, False
        self._run_until = time.perf_counter() + self.period
        torch.set_num_threads(best)
