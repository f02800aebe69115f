"""bench_defaults' grid of alternatives grows with the machine: more instances from 8 cores."""
from __future__ import annotations

from bench.bench_defaults import DEFAULTS, grid, resolved


def test_two_cores_keep_the_small_grid():
    labels = [label for label, _ in grid(2)]
    assert labels == [DEFAULTS, "--threads 1", "--lone-threads 1", "--wide-threads 1", "--inline-run-us 0",
                      "--event-loop asyncio", "--threads 2", "--instances 2", "--threads 2 --instances 2"]
    configs = dict(grid(2))
    assert resolved(configs[DEFAULTS], 2)[5] == 2                 # wide runs on two threads
    assert resolved(configs["--wide-threads 1"], 2)[5] == 1
    assert resolved(configs["--threads 2"], 2)[5] == 1            # the shared session has as many already


def test_sixteen_cores_add_a_thread_per_core_and_more_instances():
    configs = dict(grid(16))
    assert list(configs)[-3:] == ["--threads 16", "--instances 4", "--threads 2 --instances 8"]
    assert len(configs) == len(grid(16))                          # no configuration twice
    assert resolved(configs["--instances 4"], 16)[:3] == (4, 4, 2)
    assert resolved(configs["--threads 2 --instances 8"], 16)[:3] == (2, 8, 2)
    assert resolved(configs[DEFAULTS], 16)[:3] == (4, 2, 2)
    assert resolved(configs["--inline-run-us 0"], 16)[:4] == (4, 2, 2, 0) != resolved(configs[DEFAULTS], 16)[:4]
    assert resolved(configs["--event-loop asyncio"], 16) == (4, 2, 2, 200, "asyncio", 1)
    assert resolved(configs[DEFAULTS], 16)[4] == "uvloop"   # installed with rnnserve (pyproject)
