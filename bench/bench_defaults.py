"""The server's default onnxruntime threading against the alternatives, side by side in one run.

    python -m bench.bench_defaults [--seconds 2] [--rounds 2] [--margin 0.05]   # repo root

`rnnserve-server` chooses --threads / --instances left at 0 from the cores it may use
(serve/settings.py machine_threading, logged at start). This starts it with those defaults and
with each alternative of a small grid (the first column), one server at a time on 127.0.0.1
port 0, and measures each with the same tritonclient.grpc loads as bench_server / bench_batching,
on the same 2-layer LSTM char model (bench_server.build_repository), every other flag default:
  stateless, c=C    batch 1 x seq 64, C threads each calling infer() for --seconds: req/s, p50
  streaming         N sequences x S one-token steps over K pipelined streams
                    (sequence_clients.stream_sequences): steps/s; answers checked against
                    in-process onnxruntime
Every round measures every configuration, in an order that rotates from round to round, and the
tables show the median over the rounds, so drift of the machine's load hits all alike. Per load:
the ratio of the defaults to the best alternative (raw), and "defaults >= best: met" when the
throughput ratio is >= 1 - margin and, for stateless loads, the p50 is <= (1 + margin) x the
lowest alternative's. Spinning is not in the grid: the intra-op pool never spins
(serve/engine/runtime.py) and no flag turns it on.
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
from rnnserve.serve.settings import machine_threading

DEFAULTS = "defaults"


def grid(cores: int) -> list[tuple[str, list[str]]]:
    """(label, server flags): the defaults first, then the alternatives."""
    alternatives = ["--threads 1", "--threads 2", "--instances 2", "--threads 2 --instances 2"]
    if cores > 2:
        alternatives.append(f"--threads {cores}")        # onnxruntime's own default: a thread per core
    return [(DEFAULTS, [])] + [(a, a.split()) for a in alternatives]


def resolved(flags: list[str], cores: int) -> tuple[int, int]:
    """The (intra-op threads, instances) a server started with `flags` runs with."""
    given = dict(zip(flags[::2], map(int, flags[1::2])))
    threads, instances = machine_threading(cores)
    return given.get("--threads", threads), given.get("--instances", instances)


def measure(address: str, args, tokens: np.ndarray, seq_tokens: np.ndarray, ref: np.ndarray,
            base_id: int) -> dict[str, tuple[float, float]]:
    """Every load against one server -> {load: (throughput, p50 ms or nan)}."""
    out = {}
    for c in args.concurrency:
        r = run_load(infer_call(address, tokens), c, args.seconds)
        out[f"c{c}"] = (r["rps"], r["p50"])
    t0 = time.perf_counter()
    last = stream_sequences(address, seq_tokens, base_id, args.streams)
    out["stream"] = (seq_tokens.size / (time.perf_counter() - t0), float("nan"))
    diff = float(np.abs(last - ref).max())
    assert diff < 1e-3, f"streamed answers differ from in-process onnxruntime by {diff}"
    return out


def run_rounds(args, configs, repo: str, tmp: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """-> {config: {load: [(throughput, p50) per round]}}."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(VOCAB), size=(1, SEQ), dtype=np.int64)
    seq_tokens = rng.integers(0, len(VOCAB), size=(args.sequences, args.steps), dtype=np.int64)
    session = create_session(os.path.join(repo, MODEL, "1", "model.onnx"), [CPU], "cpu", intra_op_threads=1)
    ref = local_steps(session, seq_tokens, args.sequences)
    results: dict = {label: {} for label, _ in configs}
    for r in range(args.rounds):
        for k in range(len(configs)):
            label, flags = configs[(k + r) % len(configs)]
            proc, address = start_server(repo, 0, Path(tempfile.mkdtemp(dir=tmp)) / "port", flags)
            try:
                for load, figures in measure(address, args, tokens, seq_tokens, ref, 1 + r).items():
                    results[label].setdefault(load, []).append(figures)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            print(f"  round {r + 1}/{args.rounds}: {label} done", flush=True)
    return results


def print_tables(args, configs, results, cores: int, load_before) -> bool:
    """One table per load; -> whether the defaults met the bar on every load."""
    threads, instances = machine_threading(cores)
    print(f"\nmodel: 2-layer LSTM, vocab {len(VOCAB)}, emb 64, hidden 256; cpu cores {cores}: defaults = "
          f"--threads {threads} --instances {instances} here; {args.rounds} rounds, median shown; "
          f"stateless {args.seconds:g} s per measurement; load average before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    loads = [(f"c{c}", f"stateless, batch 1 x seq {SEQ}, concurrency {c}", "req/s") for c in args.concurrency]
    loads.append(("stream", f"streaming, {args.sequences} sequences x {args.steps} one-token steps over "
                            f"{args.streams} streams", "steps/s"))
    all_met = True
    for load, title, unit in loads:
        med = {label: (statistics.median(v for v, _ in results[label][load]),
                       statistics.median(p for _, p in results[label][load])) for label, _ in configs}
        stateless = load != "stream"
        print(f"\n{title}\n{'configuration':<28} {unit:>9} {'p50 ms' if stateless else '':>8}  per round ({unit})")
        for label, flags in configs:
            rounds = ", ".join(f"{v:.0f}" for v, _ in results[label][load])
            p50 = f"{med[label][1]:>8.3f}" if stateless else f"{'':>8}"
            same = " (= defaults here)" if label != DEFAULTS and resolved(flags, cores) == resolved([], cores) else ""
            print(f"{label:<28} {med[label][0]:>9.1f} {p50}  {rounds}{same}")
        alternatives = [label for label, _ in configs if label != DEFAULTS]
        best = max(alternatives, key=lambda a: med[a][0])
        ratio = med[DEFAULTS][0] / med[best][0]
        met = ratio >= 1 - args.margin
        line = f"defaults / best alternative ({best}): {unit} {ratio:.3f}x"
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
                        help="per stateless measurement (a full run takes about 5 configurations x "
                             "--rounds x (3 x --seconds + the streaming run + a server start))")
    parser.add_argument("--rounds", type=int, default=2, help="every configuration measured once per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="stateless concurrencies")
    parser.add_argument("--sequences", type=int, default=64, help="streamed sequences")
    parser.add_argument("--steps", type=int, default=256, help="one-token steps per sequence")
    parser.add_argument("--streams", type=int, default=4, help="tritonclient streams carrying the sequences")
    parser.add_argument("--margin", type=float, default=0.05, help="noise margin of the met/missed verdict")
    args = parser.parse_args(argv)
    args.rounds = max(1, args.rounds)
    load_before = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    configs = grid(cores)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_rounds(args, configs, build_repository(tmp), tmp)
    print_tables(args, configs, results, cores, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
