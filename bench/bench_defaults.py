"""The server's default onnxruntime threading against the alternatives, side by side in one run.

    python -m bench.bench_defaults [--seconds 2] [--rounds 5] [--margin 0.05]   # repo root

`rnnserve-server` chooses --threads / --instances / --lone-threads / --wide-threads left at 0 from the cores it may use
(serve/settings.py machine_threading, logged at start). This starts it with those defaults and
with each alternative of a small grid (the first column), each on 127.0.0.1 port 0, and
measures each with the same tritonclient.grpc loads as bench_server / bench_batching, on the
same 2-layer LSTM char model (bench_server.build_repository), every other flag default:
  stateless, c=C    batch 1 x seq 64, C threads each calling infer() for --seconds: req/s, p50, p99
  streaming         N sequences x S one-token steps over K pipelined streams
                    (sequence_clients.stream_sequences): steps/s; answers checked against
                    in-process onnxruntime
Every round measures each load on every configuration in turn, in an order that rotates from
round to round, and the tables show the median over the rounds, so drift of the machine's load
hits all alike. Per load: the raw ratio of the defaults' median to the best alternative's, the
per-round ratios (the two measured seconds apart, so drift between rounds cancels), and
"defaults >= best: met" when the median per-round ratio is >= 1 - margin and, for stateless
loads, the defaults' p50 is <= (1 + margin) x the lowest alternative's (p99 is shown, not
judged). The row marked "(= defaults here)" runs the defaults' threading under explicit flags:
its spread from the defaults' row is the noise.
Spinning is not in the grid: the shared and wide-run intra-op pools never spin, and the lone-run
session spins only while a run is in progress (serve/engine/runtime.py); `--lone-threads 1` (no
lone runs) is, and so are `--wide-threads 1` (no wide runs), `--inline-run-us 0` (every run on the
batcher's threads, none on the event loop) and `--event-loop asyncio` (the standard library's loop
instead of uvloop).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_batching import infer_call, local_steps
from bench.bench_server import MODEL, SEQ, VOCAB, build_repository, run_load, start_server
from bench.sequence_clients import stream_sequences
from rnnserve.serve.engine.runtime import CPU, create_session
from rnnserve.serve.eventloop import resolve
from rnnserve.serve.settings import ServeSettings, machine_cores, machine_threading

DEFAULTS = "defaults"


def grid(cores: int) -> list[tuple[str, list[str]]]:
    """(label, server flags): the defaults first, then the alternatives."""
    alternatives = ["--threads 1", "--lone-threads 1", "--wide-threads 1", "--inline-run-us 0", "--event-loop asyncio",
                    "--threads 2", "--instances 2", "--threads 2 --instances 2"]
    if cores > 2:
        alternatives.append(f"--threads {cores}")        # onnxruntime's own default: a thread per core
    if cores >= 8:
        # On a big machine, more runs in progress at once: twice the instances, and four times
        # the instances at half the threads, both against the defaults' mix.
        threads, instances = machine_threading(cores)[:2]
        alternatives += [f"--instances {2 * instances}",
                         f"--threads {max(1, threads // 2)} --instances {4 * instances}"]
    return [(DEFAULTS, [])] + [(a, a.split()) for a in dict.fromkeys(alternatives)]


def resolved(flags: list[str], cores: int) -> tuple[int, int, int, int, str, int]:
    """The (intra-op threads, instances, lone-run threads, inline-run µs, event loop, wide-run threads;
    1 = none) a server started with `flags` runs with."""
    given = dict(zip(flags[::2], flags[1::2]))
    machine = machine_threading(cores)
    threads = int(given.get("--threads", machine.threads))
    wide = int(given.get("--wide-threads", machine.wide))
    return (threads, int(given.get("--instances", machine.instances)), int(given.get("--lone-threads", machine.lone)),
            int(given.get("--inline-run-us", ServeSettings.inline_run_us)),
            resolve(given.get("--event-loop", ServeSettings.event_loop)), wide if wide > threads else 1)


def measure(load: str, address: str, args, tokens: np.ndarray, seq_tokens: np.ndarray, ref: np.ndarray,
            base_id: int) -> tuple[float, float, float]:
    """One load against one server -> (throughput, p50 ms, p99 ms; nan for the streaming load)."""
    if load != "stream":
        r = run_load(infer_call(address, tokens), int(load[1:]), args.seconds)
        return r["rps"], r["p50"], r["p99"]
    t0 = time.perf_counter()
    last = stream_sequences(address, seq_tokens, base_id, args.streams)
    steps_per_s = seq_tokens.size / (time.perf_counter() - t0)
    diff = float(np.abs(last - ref).max())
    assert diff < 1e-3, f"streamed answers differ from in-process onnxruntime by {diff}"
    return steps_per_s, float("nan"), float("nan")


def run_rounds(args, configs, repo: str, tmp: str) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """One server per configuration, all started up front (idle, they cost no CPU); per round
    and load, every server in turn -> {config: {load: [(throughput, p50, p99) per round]}}."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(VOCAB), size=(1, SEQ), dtype=np.int64)
    seq_tokens = rng.integers(0, len(VOCAB), size=(args.sequences, args.steps), dtype=np.int64)
    session = create_session(os.path.join(repo, MODEL, "1", "model.onnx"), [CPU], "cpu", intra_op_threads=1)
    ref = local_steps(session, seq_tokens, args.sequences)
    loads = [f"c{c}" for c in args.concurrency] + ["stream"]
    results: dict = {label: {load: [] for load in loads} for label, _ in configs}
    servers: dict = {}
    try:
        for label, flags in configs:
            servers[label] = start_server(repo, 0, Path(tempfile.mkdtemp(dir=tmp)) / "port", flags)
        for r in range(args.rounds):
            for load in loads:
                for k in range(len(configs)):
                    label = configs[(k + r) % len(configs)][0]
                    time.sleep(args.settle)
                    results[label][load].append(measure(load, servers[label][1], args, tokens, seq_tokens, ref,
                                                        1 + r * args.sequences))
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=60)
    return results


def print_tables(args, configs, results, cores: int, load_before) -> bool:
    """One table per load; -> whether the defaults met the bar on every load."""
    threads, instances, lone, wide = machine_threading(cores)
    print(f"\nmodel: 2-layer LSTM, vocab {len(VOCAB)}, emb 64, hidden 256; cpu cores {cores}: defaults = "
          f"--threads {threads} --instances {instances} --lone-threads {lone} --wide-threads {wide} here; "
          f"{args.rounds} rounds, median shown; stateless {args.seconds:g} s per measurement; load average before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    loads = [(f"c{c}", f"stateless, batch 1 x seq {SEQ}, concurrency {c}", "req/s") for c in args.concurrency]
    loads.append(("stream", f"streaming, {args.sequences} sequences x {args.steps} one-token steps over "
                            f"{args.streams} streams", "steps/s"))
    all_met = True
    for load, title, unit in loads:
        med = {label: [statistics.median(m[i] for m in results[label][load]) for i in range(3)]
               for label, _ in configs}
        stateless = load != "stream"
        heads = f"{'p50 ms':>8} {'p99 ms':>8}" if stateless else f"{'':>17}"
        print(f"\n{title}\n{'configuration':<28} {unit:>9} {heads}  per round ({unit})")
        for label, flags in configs:
            rounds = ", ".join(f"{m[0]:.0f}" for m in results[label][load])
            latency = f"{med[label][1]:>8.3f} {med[label][2]:>8.3f}" if stateless else f"{'':>17}"
            same = " (= defaults here)" if label != DEFAULTS and resolved(flags, cores) == resolved([], cores) else ""
            print(f"{label:<28} {med[label][0]:>9.1f} {latency}  {rounds}{same}")
        alternatives = [label for label, _ in configs if label != DEFAULTS]
        best = max(alternatives, key=lambda a: med[a][0])
        ratio = med[DEFAULTS][0] / med[best][0]
        paired = [d[0] / b[0] for d, b in zip(results[DEFAULTS][load], results[best][load])]
        met = statistics.median(paired) >= 1 - args.margin
        line = (f"defaults / best alternative ({best}): {unit} {ratio:.3f}x of the medians, per round "
                f"{', '.join(f'{x:.2f}' for x in paired)} (median {statistics.median(paired):.3f}x)")
        if stateless:
            fastest = min(alternatives, key=lambda a: med[a][1])
            p50_ratio = med[DEFAULTS][1] / med[fastest][1]
            met = met and p50_ratio <= 1 + args.margin
            line += f", p50 {p50_ratio:.3f}x of the lowest ({fastest})"
        all_met = all_met and met
        print(f"{line} -> defaults >= best (margin {args.margin:.0%}): {'met' if met else 'MISSED'}")
    return all_met


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="per stateless measurement (a full run takes about the grid's configurations "
                             "(9 to 12) x --rounds x (3 x --seconds + the streaming run + 4 x --settle + 2 s))")
    # Fewer rounds let the best of the grid's noisy alternatives beat the defaults by chance (README).
    parser.add_argument("--rounds", type=int, default=5, help="every configuration measured once per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="stateless concurrencies")
    parser.add_argument("--sequences", type=int, default=64, help="streamed sequences")
    parser.add_argument("--steps", type=int, default=256, help="one-token steps per sequence")
    parser.add_argument("--streams", type=int, default=4, help="tritonclient streams carrying the sequences")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds of rest before each measurement (the previous one's clients close)")
    parser.add_argument("--margin", type=float, default=0.05, help="noise margin of the met/missed verdict")
    args = parser.parse_args(argv)
    args.rounds = max(1, args.rounds)
    load_before = os.getloadavg()
    cores = machine_cores()
    configs = grid(cores)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_rounds(args, configs, build_repository(tmp), tmp)
    met = print_tables(args, configs, results, cores, load_before)
    print(f"\ndefaults >= best alternative on every load: {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
