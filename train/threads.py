"""Pick the faster torch thread count while training, on a CPU shared with other work.

On a 2-core machine where other processes keep a core busy, two OpenMP threads
can run several times slower than one (a thread that waits at every barrier for
its descheduled partner); on an idle machine two threads win.  The tuner times
real training steps with each candidate count in turn, keeps the fastest, and
probes again every `period` seconds, so the choice follows the machine's load.
No step is wasted: the probes are ordinary training steps, but a slow candidate
makes them slow.  So a candidate is dropped from a probe as soon as one of its
steps (after its first, which warms its pool up) takes over LOSING_RATIO times the
median of a candidate already timed (twice that for its first step); counts above
the cores that the load average leaves free are not tried at all (one step with
2 threads on a busy 2-core machine took 17 s where 1 thread took 1 s); and with
`max_probe_s` (a share of the time
budget) probing stops for good once the steps spent on losing candidates add up
to it.

Thread counts change floating-point reduction order, so a tuned run is not
bit-for-bit reproducible; pass a fixed --threads for that.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


def default_candidates() -> list[int]:
    n = os.cpu_count() or 1
    return sorted({1, n})


def free_cores() -> int:
    """Cores not busy with other work: the core count less the 1-minute load average, counting this
    process's own (at least one) thread as free."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        return n
    return max(1, min(n, int(n - load + 1.5)))


LOSING_RATIO = 2.0


class ThreadTuner:
    def __init__(self, candidates: Sequence[int] = (), probe_steps: int = 4, period: float = 45.0,
                 max_probe_s: float | None = None, free: Callable[[], int] = free_cores):
        self.candidates = list(candidates) or default_candidates()
        self.probe_steps = probe_steps
        self.period = period
        self.max_probe_s = max_probe_s
        self.lost_s = 0.0  # seconds of probe steps run with a candidate that lost
        self.free = free
        self.best = self.candidates[-1]
        self._times: dict[int, list[float]] = {}
        self._probe_index = 0  # the candidate being timed while probing
        self._probing = False
        self._run_until = 0.0
        self._t_step = 0.0
        self._tried: list[int] = []
        self._start_probe()
        torch.set_num_threads(self._current())

    def _current(self) -> int:
        return self._tried[self._probe_index] if self._probing else self.best

    def _start_probe(self) -> None:
        free = self.free()
        self._tried = [c for c in self.candidates if c <= free] or self.candidates[:1]
        if len(self._tried) > 1:
            self._probing, self._probe_index, self._times = True, 0, {}
            return
        if self._tried[0] != self.best:
            log.info("threads: %d -> %d (the load average leaves %d core(s) free)", self.best, self._tried[0],
                     free)
        self.best = self._tried[0]
        self._run_until = time.perf_counter() + self.period

    def start_step(self) -> None:
        if (not self._probing and len(self.candidates) > 1 and time.perf_counter() >= self._run_until
                and (self.max_probe_s is None or self.lost_s < self.max_probe_s)):
            self._start_probe()
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
        timed = [statistics.median(v) for k, v in self._times.items() if k != n]
        ratio = LOSING_RATIO if len(times) > 1 else 2 * LOSING_RATIO
        losing = bool(timed) and times[-1] > ratio * min(timed)
        if len(times) < self.probe_steps and not losing:
            return
        self._probe_index += 1
        if self._probe_index < len(self._tried):
            return
        # The first step after a switch warms the thread pool up: judge by the median.
        medians = {k: statistics.median(v) for k, v in self._times.items()}
        best = min(medians, key=medians.get)
        self.lost_s += sum(sum(v) for k, v in self._times.items() if k != best)
        if best != self.best:
            log.info("threads: %d -> %d (median step %s)", self.best, best,
                     ", ".join(f"{k} threads {v * 1000:.0f} ms" for k, v in medians.items()))
        if self.max_probe_s is not None and self.lost_s >= self.max_probe_s:
            log.info("threads: %d from now on (%.0f s of probing spent, the limit)", best, self.lost_s)
        self.best, self._probing = best, False
        self._run_until = time.perf_counter() + self.period
        torch.set_num_threads(best)
