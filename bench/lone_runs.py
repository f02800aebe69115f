"""Lone runs in process: one model alone, and two models at concurrency 1 each, side by side.

    python -m bench.lone_runs [--seconds 3]    # repo root

The bench model (bench_server.build_repository: the 2-layer LSTM char model) is loaded twice,
as two models of one DataPlane with the server's default threading, so each has its shared
session and its lone-run session (serve/engine/runtime.py). The load is batch 1 x seq 64,
called straight on the ModelInstance, in four ways:
  shared          one thread, ModelInstance.run: the shared session
  lone            one thread, ModelInstance.run(lone=True): the lone session
  2x shared       two threads, one per model, on the shared sessions
  2x lone, forced two threads on the lone sessions themselves (what lone runs would do without the
                  process-wide rule: each waits for the other's spinning threads at every step)
  2x lone, rule   two threads, ModelInstance.run(lone=True): a run goes lone only when no other
                  run is in progress in the process
It prints runs/s (all threads together), p50 and p99 per run, and the share of runs that went lone.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

from bench.bench_server import MODEL, SEQ, build_repository
from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.settings import ServeSettings

OTHER = f"{MODEL}2"


class Counting:
    """A session whose run() calls are counted (to tell how many runs went lone)."""

    def __init__(self, session):
        self.session, self.calls = session, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)


def load(calls: list[Callable[[], object]], seconds: float) -> dict:
    """Each call in a thread of its own, in a loop for `seconds` -> runs/s together, p50, p99 (ms), and
    the process CPU ms per run (every onnxruntime thread)."""
    times: list[list[float]] = [[] for _ in calls]
    for call in calls:
        for _ in range(5):
            call()
    start, stop_at = threading.Barrier(len(calls) + 1), [0.0]

    def loop(i: int) -> None:
        start.wait()
        while (t0 := time.perf_counter()) < stop_at[0]:
            calls[i]()
            times[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    stop_at[0] = time.perf_counter() + seconds
    start.wait()
    for t in threads:
        t.join()
    flat = np.array([x for own in times for x in own]) * 1e3
    return {"rps": len(flat) / seconds, "p50": float(np.percentile(flat, 50)), "p99": float(np.percentile(flat, 99)),
            "cpu": (time.process_time() - cpu0) * 1e3 / len(flat)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        shutil.copytree(os.path.join(repo, MODEL), os.path.join(repo, OTHER))
        dp = DataPlane(ServeSettings(repository=repo, device="cpu"))
        dp.load()
        try:
            insts = [dp.engine(name).inst for name in (MODEL, OTHER)]
            if any(inst.lone_session is None for inst in insts):
                print("no lone sessions with this machine's defaults (--lone-threads): nothing to compare")
                return 1
            for inst in insts:
                inst.lone_session = Counting(inst.lone_session)
            feeds = {"tokens": np.zeros((1, SEQ), np.int64)}
            names = insts[0].output_names
            rows = []
            for label, calls in (
                    ("shared", [lambda: insts[0].run(feeds)]),
                    ("lone", [lambda: insts[0].run(feeds, lone=True)]),
                    ("2x shared", [lambda i=i: i.run(feeds) for i in insts]),
                    ("2x lone, forced", [lambda i=i: i.lone_session.run(names, {**feeds, **dict(
                        zip(i.state_inputs, i.zero_states(1)))}) for i in insts]),
                    ("2x lone, rule", [lambda i=i: i.run(feeds, lone=True) for i in insts])):
                before = sum(i.lone_session.calls for i in insts)
                r = load(calls, args.seconds)
                lone = sum(i.lone_session.calls for i in insts) - before
                rows.append((label, r, lone / max(1.0, r["rps"] * args.seconds + 5 * len(calls))))
        finally:
            dp.close()
    print(f"\nbatch 1 x seq {SEQ}, the bench LSTM twice; {os.cpu_count()} CPUs; {args.seconds:g} s each; "
          f"load average after {os.getloadavg()[0]:.2f}")
    print(f"| {'mode':<16} | {'runs/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'lone':>5} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 7}|")
    for label, r, share in rows:
        print(f"| {label:<16} | {r['rps']:>8.0f} | {r['p50']:>7.3f} | {r['p99']:>7.3f} | {share:>5.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
