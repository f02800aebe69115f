"""Issue 14: streamed sequences with the Redis state store against the memory store, in one run.

    python -m bench.bench_statestore [--sequences 64] [--steps 256] [--streams 4] [--rounds 3]

Model: bench.bench_server's 2-layer LSTM char model (vocab 65, emb 64, hidden 256), random
weights. Servers: `rnnserve-server` subprocesses on 127.0.0.1, `--threads 1`; Redis: a real
redis-server on a free loopback port, without persistence (tests/cluster.py). Clients:
tritonclient.grpc streams (bench.sequence_clients.stream_sequences), N sequences over K streams,
each with a stream to every server; each sequence sends its next single-token step when the
previous answer arrives, with its step id in the `sequence_step` parameter.

Servers: one with the memory store, two with the Redis store, all started up front; every row is
run --rounds times, the rows alternating, and the median run is reported (the machine's load
drifts). Rows: the memory store on one replica (the baseline), the Redis store on one replica, the Redis
store on two replicas with each sequence kept on one of them (what Envoy's ring hash on the
`sequence-id` header gives), and on two replicas with every step sent to the other replica
than the step before (no affinity: every step loads the state from Redis). Columns: steps/s and
its ratio to the baseline (goal: Redis on one replica >= 0.7x), onnxruntime rows per run,
server CPU ms per step (all replicas), redis-server CPU ms per step, the store's calls per
step (Redis INFO commandstats: one CAS write, EVALSHA, per step, one HMGET per load), and the largest difference of
the last logits from the baseline run (0: every row computed the same numbers).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc

from bench.bench_server import MODEL, VOCAB, build_repository, start_server
from bench.floor import process_cpu_s
from bench.sequence_clients import stream_sequences
from tests.cluster import RedisServer


def _runs_rows(addresses: list[str]) -> tuple[int, int]:
    runs = rows = 0
    for a in addresses:
        with tc.InferenceServerClient(a) as c:
            s = c.get_inference_statistics(MODEL).model_stats[0]
        runs, rows = runs + s.execution_count, rows + s.inference_count
    return runs, rows


def _store_commands(redis_server: RedisServer | None) -> int:
    """The store's calls so far: CAS writes (EVALSHA) and loads (HMGET)."""
    if redis_server is None:
        return 0
    with redis_server.client() as r:
        stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "hmget"))


def measure(label: str, servers: list, tokens: np.ndarray, streams: int, alternate: bool,
            redis_server: RedisServer | None, base_id: int) -> dict:
    addresses = [a for _, a in servers]
    pids = [p.pid for p, _ in servers]
    stream_sequences(addresses, tokens[:, :8], base_id + 500_000, streams, alternate, step_ids=True)   # warm up
    runs0, rows0 = _runs_rows(addresses)
    cmd0 = _store_commands(redis_server)
    redis_pid = redis_server.proc.pid if redis_server else None
    cpu0 = [process_cpu_s(p) for p in pids]
    rcpu0 = process_cpu_s(redis_pid) if redis_pid else 0.0
    t0 = time.perf_counter()
    last = stream_sequences(addresses, tokens, base_id, streams, alternate, step_ids=True)
    secs = time.perf_counter() - t0
    n = tokens.size
    runs1, rows1 = _runs_rows(addresses)
    return {"label": label, "steps_s": n / secs, "rows_run": (rows1 - rows0) / max(1, runs1 - runs0),
            "server_ms": sum(process_cpu_s(p) - c for p, c in zip(pids, cpu0)) * 1e3 / n,
            "redis_ms": ((process_cpu_s(redis_pid) - rcpu0) * 1e3 / n) if redis_pid else 0.0,
            "cmds": (_store_commands(redis_server) - cmd0) / n if redis_server else 0.0, "last": last}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--streams", type=int, default=4, help="tritonclient streams per server")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per server")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every row, alternating; medians")
    args = parser.parse_args(argv)
    tokens = np.random.default_rng(1).integers(0, len(VOCAB), size=(args.sequences, args.steps), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        redis_server = RedisServer(Path(tmp) / "redis").start()
        flags = ["--max-batch-size", str(args.sequences), "--no-warmup"]
        started = []
        try:
            for i, store in enumerate(["memory", redis_server.url, redis_server.url]):
                started.append(start_server(repo, args.threads, Path(tmp) / f"port-{i}",
                                            [*flags, "--state-store", store]))
            memory, r0, r1 = started
            plans = [("memory store, 1 replica", [memory], False, None),
                     ("redis store, 1 replica", [r0], False, redis_server),
                     ("redis store, 2 replicas, sequence affinity", [r0, r1], False, redis_server),
                     ("redis store, 2 replicas, steps alternate", [r0, r1], True, redis_server)]
            # Rounds, each plan once per round, medians reported: the machine's load drifts.
            runs = [[measure(label, group, tokens, args.streams, alternate, rs, 1_000_000 * (k + 1 + 10 * rnd))
                     for k, (label, group, alternate, rs) in enumerate(plans)] for rnd in range(args.rounds)]
        finally:
            for proc, _ in started:
                proc.terminate()
                proc.wait(30)
            redis_server.stop()
    results = []
    for k in range(len(plans)):
        per = [r[k] for r in runs]
        mid = sorted(per, key=lambda r: r["steps_s"])[len(per) // 2]
        results.append({**mid, **{key: float(np.median([r[key] for r in per]))
                                  for key in ("server_ms", "redis_ms", "cmds", "rows_run")},
                        "spread": (min(r["steps_s"] for r in per), max(r["steps_s"] for r in per))})
    base = results[0]
    load = os.getloadavg()
    print(f"\n{args.sequences} sequences x {args.steps} single-token steps, {args.streams} tritonclient streams "
          f"per server, onnxruntime --threads {args.threads}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores)")
    head = ("run", "steps/s (median)", "min-max", "x memory", "rows/run", "server CPU ms/step", "redis CPU ms/step",
            "store cmds/step", "max |dlogit|")
    rows = [head] + [(r["label"], f"{r['steps_s']:.0f}", "{:.0f}-{:.0f}".format(*r["spread"]),
                      f"{r['steps_s'] / base['steps_s']:.2f}",
                      f"{r['rows_run']:.1f}", f"{r['server_ms']:.3f}", f"{r['redis_ms']:.3f}", f"{r['cmds']:.2f}",
                      f"{float(np.abs(r['last'] - base['last']).max()):.1e}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    extra = results[1]["server_ms"] - base["server_ms"]
    print(f"the store's cost per step (1 replica): {extra:+.3f} ms server CPU, "
          f"{results[1]['redis_ms']:.3f} ms redis-server CPU")


if __name__ == "__main__":
    main()
