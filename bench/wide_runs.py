"""Wide runs in process: the shared session against the wide-run session, by rows per run.

    python -m bench.wide_runs [--seconds 1] [--rows 1 4 8 12 32]    # repo root

The bench model (bench_server.build_repository: the 2-layer LSTM char model) is loaded in a
DataPlane with the server's default threading, so on a machine that has wide runs (2 or 3
cores: serve/settings.py machine_threading) it has its shared session (1 intra-op thread)
and its wide-run session (--wide-threads, never spinning). For each row count R it calls
ModelInstance.run on R rows x seq 64 in one thread, on each session in turn for --seconds,
and prints the p50 time per run, the process CPU per run (every onnxruntime thread) and the
wide session's p50 as a share of the shared one's. No client and no front end: what a
second thread gains on a run alone (the server applies it from WIDE_MIN_ROWS rows:
serve/engine/runkinds.py).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from bench.bench_server import MODEL, SEQ, VOCAB, build_repository
from bench.lone_runs import load
from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.engine.runkinds import WIDE_MIN_ROWS
from rnnserve.serve.settings import ServeSettings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="per session and row count")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, WIDE_MIN_ROWS, 12, 32], help="rows per run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dp = DataPlane(ServeSettings(repository=build_repository(tmp), device="cpu"))
        dp.load()
        try:
            inst = dp.engine(MODEL).inst
            if inst.wide_session is None:
                print(f"no wide-run session with this machine's defaults ({dp.settings.wide_threads} wide-run "
                      f"threads, {dp.settings.intra_op_threads} shared): nothing to compare")
                return 1
            rng = np.random.default_rng(0)
            rows = []
            for n in args.rows:
                feeds = {"tokens": rng.integers(0, len(VOCAB), size=(n, SEQ), dtype=np.int64)}
                shared = load([lambda: inst.run(feeds)], args.seconds)
                wide = load([lambda: inst.run(feeds, wide=True)], args.seconds)
                rows.append((n, shared, wide))
        finally:
            dp.close()
    s = dp.settings
    print(f"\nbatch R x seq {SEQ}, the bench LSTM; {len(os.sched_getaffinity(0))} CPUs; shared session "
          f"{s.intra_op_threads} thread(s), wide-run session {s.wide_threads}; {args.seconds:g} s each; "
          f"load average after {os.getloadavg()[0]:.2f}")
    print("| rows | shared p50 ms | shared CPU ms | wide p50 ms | wide CPU ms | wide / shared p50 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, shared, wide in rows:
        print(f"| {n} | {shared['p50']:.3f} | {shared['cpu']:.3f} | {wide['p50']:.3f} | {wide['cpu']:.3f} "
              f"| {wide['p50'] / shared['p50']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
