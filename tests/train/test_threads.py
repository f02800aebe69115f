"""The thread tuner's cost is bounded: a losing thread count is dropped after one step, counts the
load leaves no core for are not tried, and probing stops once max_probe_s is spent.

The "training step" sleeps for a time that depends on torch's real thread setting, so the
outcome is known in advance."""
from __future__ import annotations

import time

import torch

from rnnserve.train.threads import ThreadTuner

STEP_S = {1: 0.01, 2: 0.1}   # two threads are 10x slower, as on a busy 2-core machine


def _steps(tuner: ThreadTuner, n: int) -> list[int]:
    used = []
    for _ in range(n):
        tuner.start_step()
        used.append(torch.get_num_threads())
        time.sleep(STEP_S[used[-1]])
        tuner.end_step()
    return used


def test_a_losing_count_is_dropped_after_one_step_and_probing_stops_at_its_limit():
    tuner = ThreadTuner(candidates=(1, 2), probe_steps=4, period=0.0, max_probe_s=0.15, free=lambda: 2)
    used = _steps(tuner, 14)
    assert used[:5] == [1, 1, 1, 1, 2]           # one step of 2 threads, not four
    assert tuner.best == 1
    assert used.count(2) == 2                     # one more probe (period 0), then the limit: 2 x 0.1 s >= 0.15
    assert tuner.lost_s >= 0.15 and used[-4:] == [1, 1, 1, 1]


def test_counts_above_the_free_cores_are_not_tried():
    tuner = ThreadTuner(candidates=(1, 2), probe_steps=4, period=0.0, free=lambda: 1)
    assert _steps(tuner, 6) == [1] * 6 and tuner.lost_s == 0.0


def test_the_faster_count_wins_when_it_is_faster():
    global STEP_S
    saved, STEP_S = STEP_S, {1: 0.03, 2: 0.01}
    try:
        tuner = ThreadTuner(candidates=(1, 2), probe_steps=3, period=60.0, free=lambda: 2)
        used = _steps(tuner, 8)
    finally:
        STEP_S = saved
    assert used == [1, 1, 1, 2, 2, 2, 2, 2] and tuner.best == 2
