"""Where a streamed step's server CPU goes, thread by thread, and what gRPC's listener and the event loop change.

    python -m bench.stream_threads [--seconds 6] [--rounds 3]

Starts `rnnserve-server` (default flags) and bench.floor's grpc.aio canned-answer server, each
with three settings: grpc's own defaults (GRPC_EXPERIMENTS empty), the setting rnnserve-server
makes for itself (serve/grpc_core.py), and that setting on asyncio's event loop instead of
uvloop (--event-loop asyncio; serve/eventloop.py). It streams 64 sequences of one-token
steps over 4 tritonclient streams at each (bench.sequence_clients.stream_sequences, as in
bench_batching's streaming table) for --seconds. It reads every server thread's CPU time and
context switches from /proc/<pid>/task before and after, and prints per step: the process's
CPU, its voluntary switches (a thread that blocks: waiting for the GIL, a lock, a socket) and
involuntary ones (preempted), and each busy thread's share. Python threads all show as
"python" in /proc; the busiest one of rnnserve-server is its event loop. Linux only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_server import SEQ, VOCAB, build_repository, start_server
from bench.floor import process_cpu_s, start_floor_server, stat_cpu_s
from bench.sequence_clients import stream_sequences
from rnnserve.serve.grpc_core import EXPERIMENTS_ENV, SERVER_EXPERIMENTS

SEQUENCES, STREAMS = 64, 4


def threads_of(pid: int) -> dict[str, tuple[str, float, int, int]]:
    """{tid: (name, CPU seconds, voluntary switches, involuntary switches)} of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:   # the thread ended meanwhile
            continue
        counts = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out[tid] = (stat[stat.index("(") + 1:stat.rindex(")")], stat_cpu_s(stat),
                    int(counts["voluntary_ctxt_switches"]), int(counts["nonvoluntary_ctxt_switches"]))
    return out


def measure(pid: int, address: str, seconds: float, base_id: int) -> dict:
    tokens = np.random.default_rng(1).integers(0, len(VOCAB), size=(SEQUENCES, 256), dtype=np.int64)
    stream_sequences(address, tokens[:, :16], base_id, STREAMS)   # warm up
    before, cpu0, t0 = threads_of(pid), process_cpu_s(pid), time.perf_counter()
    steps, n = 0, 1
    while time.perf_counter() - t0 < seconds:
        stream_sequences(address, tokens, base_id + n * SEQUENCES, STREAMS)
        steps, n = steps + tokens.size, n + 1
    wall, cpu, after = time.perf_counter() - t0, process_cpu_s(pid) - cpu0, threads_of(pid)
    per_thread = []
    for tid, (name, t_cpu, vol, invol) in after.items():
        b = before.get(tid, (name, 0.0, 0, 0))
        per_thread.append((name, (t_cpu - b[1]) * 1e3 / steps, (vol - b[2]) / steps, (invol - b[3]) / steps))
    per_thread.sort(key=lambda t: -t[1])
    return {"steps/s": steps / wall, "cpu": cpu * 1e3 / steps, "vol": sum(t[2] for t in per_thread),
            "invol": sum(t[3] for t in per_thread), "threads": per_thread}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="streaming time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each server and setting")
    args = parser.parse_args(argv)
    settings = {  # label: (GRPC_EXPERIMENTS, --event-loop)
        "grpc's defaults": ("", "auto"),
        "rnnserve-server's": (SERVER_EXPERIMENTS, "auto"),
        "rnnserve-server's, asyncio loop": (SERVER_EXPERIMENTS, "asyncio"),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        for r in range(args.rounds):
            for i, (label, (experiments, loop)) in enumerate(settings.items()):
                os.environ[EXPERIMENTS_ENV] = experiments   # read by the servers started below
                for kind in ("rnnserve-server", "grpc.aio floor"):
                    port_file = Path(tmp) / f"port-{r}-{kind}-{i}"
                    proc, address = (start_server(repo, 0, port_file, ["--event-loop", loop])
                                     if kind == "rnnserve-server"
                                     else start_floor_server(port_file, SEQ, aio=True, event_loop=loop))
                    try:
                        rows.append((kind, label, measure(proc.pid, address, args.seconds, 1000 * (r + 1))))
                    finally:
                        proc.terminate()
                        proc.wait()
    print(f"\n{SEQUENCES} sequences x one-token steps over {STREAMS} tritonclient streams, {args.seconds:g} s "
          f"each; {len(os.sched_getaffinity(0))} CPUs; per step of the server process:")
    print("| server | settings | steps/s | CPU ms | voluntary switches | involuntary | "
          "busiest threads: CPU ms (voluntary switches) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for kind, label, m in rows:
        busy = ", ".join(f"{name} {cpu:.3f} ({vol:.2f})" for name, cpu, vol, _ in m["threads"][:6] if cpu >= 0.0005)
        print(f"| {kind} | {label} | {m['steps/s']:.0f} | {m['cpu']:.3f} | {m['vol']:.2f} | {m['invol']:.2f} "
              f"| {busy} |")
    print(f"\nmedians of {args.rounds} rounds (the settings alternate within each round):")
    print("| server | settings | steps/s | CPU ms per step | voluntary switches per step |")
    print("|---|---|---:|---:|---:|")
    for kind in ("rnnserve-server", "grpc.aio floor"):
        for label in settings:
            ms = [m for k, lab, m in rows if k == kind and lab == label]
            print(f"| {kind} | {label} | {statistics.median(m['steps/s'] for m in ms):.0f} "
                  f"| {statistics.median(m['cpu'] for m in ms):.3f} | {statistics.median(m['vol'] for m in ms):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
