"""Over the wire: dynamic batching and server-side sequences, side by side in one run.

    python -m bench.bench_batching [--seconds 5] [--sequences 64] [--steps 256] [--threads 1]

Model: the 2-layer LSTM char model (vocab 65, emb 64, hidden 256), random weights, saved with
train.checkpoint.save_checkpoint and exported with export.onnx_export.export_checkpoint
(bench.bench_server.build_repository). The server is `rnnserve-server` as a subprocess on
127.0.0.1; every client is tritonclient.grpc, unchanged. Thread settings: the server's
default flags (serve/settings.py machine_threading) unless --threads; in process, the same
intra-op thread count as the server's shared session, inter-op 1.

Table 1, stateless: batch 1, seq 64, concurrency 1, 8 and 32 for --seconds each:
  in-process          C threads calling one onnxruntime session, one request per run (no batching)
  in-process, lone    (C = 1) the same loop on a session made like the server's lone-run session
                      (--lone-threads, spinning while it runs), where the server runs that request
  in-process batched  one thread running batch = C rows per run (each row waits the whole run)
  server              C threads, each with its own tritonclient, calling infer() in a loop
  Goals (issue 12): at C >= 8 server >= 1.0x in-process; at C = 1 server p50 <= in-process
  p50 + 0.5 ms (and the same against the lone loop, printed below it).
  The table ends with the gRPC floor: bench.floor's server answers a canned response of the
  same size, through the same tritonclient call, at concurrency 1: the round trip no Python
  gRPC server on this machine can go under.
Table 2, streaming: N sequences x S single-token steps (sequence_id/start/end), through
  the server (--max-batch-size N) and through a second server started with
  --max-batch-size 1 (one step per onnxruntime run), with the client shapes of
  bench/sequence_clients.py: unary (N threads, one step after another), stream (K
  tritonclient streams, each carrying N/K sequences, pipelined), and many sequences per
  request (every sequence a row of each request, unary and on one stream). Aggregate
  steps/s, onnxruntime rows per run (ModelStatistics), the ratio to the max-batch-1
  server's, and the CPU time per step of the client process and of the server process
  (/proc). It ends with bench.floor's canned answers to the same streams, from a threaded
  grpcio server and from a grpc.aio one (rnnserve-server's kind): the front end alone.
Table 3, prefix: one sequence of n tokens predicted one token at a time: the naive client
  resends the whole prefix each step (stateless, O(n^2) work) vs the server keeping the
  state (sequence steps of one token, O(n)).

perf_analyzer (tritonclient[grpc]==2.41.0's bin/perf_analyzer) against the same server.
It needs Debian's libb64-0d and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel:

    apt-get install -y libb64-0d
    .venv/bin/pip download --no-deps nvidia-cuda-runtime-cu12 -d /tmp/cudart
    (cd /tmp/cudart && unzip -q -o nvidia_cuda_runtime_cu12-*.whl)
    export LD_LIBRARY_PATH=/tmp/cudart/nvidia/cuda_runtime/lib:$LD_LIBRARY_PATH
    python -c 'from bench.bench_server import build_repository as b; print(b("/tmp/pa"))'
    rnnserve-server --repository /tmp/pa/repo --port 8001 --device cpu --threads 1 &
    # the model reports sequence_batching, so perf_analyzer always runs its sequence mode;
    # a JSON data file (shipped in bench/perf_analyzer/) sends `tokens` only (the state inputs are
    # optional: server-kept)
    # stateless-style load: every request is a sequence of one step (START+END), batch 1 x seq 64
    .venv/bin/perf_analyzer -m charlm -u 127.0.0.1:8001 -i grpc --input-data bench/perf_analyzer/tokens.json \\
        --concurrency-range 8
    # sequences of 64 single-token steps, ids 1..1000, unary and then over a stream
    .venv/bin/perf_analyzer -m charlm -u 127.0.0.1:8001 -i grpc --input-data bench/perf_analyzer/step.json \\
        --sequence-length 64 --sequence-id-range 1:1000 --concurrency-range 8
    .venv/bin/perf_analyzer -m charlm -u 127.0.0.1:8001 -i grpc --input-data bench/perf_analyzer/step.json \\
        --sequence-length 64 --sequence-id-range 1:1000 --concurrency-range 8 --streaming

On a loaded machine add `-p 10000` (a longer measurement window) when perf_analyzer says
"Failed to obtain stable measurement". The three runs finish with "Server: Inference count ...
Execution count ..." lines: ModelStatistics
counts queue/compute_input/compute_infer/compute_output once per request (perf_analyzer stops with
"Server side statistics compute counts must be the same" otherwise), execution_count per run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc

from bench.batching_report import print_report
from bench.bench_server import (
    MODEL,
    SEQ,
    VOCAB,
    build_repository,
    local_thread_count,
    providers_for,
    run_load,
    start_server,
)
from bench.floor import own_cpu_s, process_cpu_s, start_floor_server
from bench.sequence_clients import row_sequences, stream_sequences, tokens_input, unary_sequences
from rnnserve.serve.engine.runtime import create_session
from rnnserve.serve.settings import machine_cores, machine_threading


def _feeds(session, tokens: np.ndarray) -> dict[str, np.ndarray]:
    batch = tokens.shape[0]
    return {i.name: tokens if i.name == "tokens" else np.zeros((i.shape[0], batch, i.shape[2]), np.float32)
            for i in session.get_inputs()}


def _runs_and_rows(address: str) -> tuple[int, int, dict[int, int]]:
    """-> (onnxruntime runs, rows, {rows in a run: runs}) of the model so far (ModelStatistics)."""
    with tc.InferenceServerClient(address) as client:
        s = client.get_inference_statistics(MODEL).model_stats[0]
    return s.execution_count, s.inference_count, {b.batch_size: b.compute_infer.count for b in s.batch_stats}


def ort_cpu_ms(session, runs_by_rows: dict[int, int], steps: int, repeats: int = 100) -> float:
    """onnxruntime's CPU ms per step for the server's runs of single-token steps ({rows in a run: runs}),
    each run size timed in this process (process CPU time: every onnxruntime thread) on the same model."""
    total = 0.0
    for rows, runs in runs_by_rows.items():
        feeds = _feeds(session, np.zeros((rows, 1), np.int64))
        for _ in range(5):
            session.run(None, feeds)
        cpu0 = time.process_time()
        for _ in range(repeats):
            session.run(None, feeds)
        total += runs * (time.process_time() - cpu0) / repeats
    return total * 1e3 / steps


# -- table 1: stateless --------------------------------------------------------------------------
def batched_load(session, concurrency: int, seconds: float) -> dict:
    """One thread, batch = concurrency rows per run; every row's latency is the run's."""
    rng = np.random.default_rng(concurrency)
    feeds = _feeds(session, rng.integers(0, len(VOCAB), size=(concurrency, SEQ), dtype=np.int64))
    for _ in range(3):
        session.run(None, feeds)
    lat = []
    t_end = time.perf_counter() + seconds
    t_begin = time.perf_counter()
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        session.run(None, feeds)
        lat.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - t_begin
    ms = np.array(lat) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "rps": concurrency * len(lat) / elapsed}


def infer_call(address: str, tokens: np.ndarray):
    """A make_call for run_load: its own tritonclient, infer() of tokens, logits requested."""
    def make():
        client = tc.InferenceServerClient(address)
        tensor = tokens_input(tokens)
        outputs = [tc.InferRequestedOutput("logits")]
        return lambda: client.infer(MODEL, [tensor], outputs=outputs)
    return make


def floor_runs(tmp: str, seconds: float, tokens: np.ndarray, streams: int) -> tuple[dict, list]:
    """bench.floor's canned-answer servers: concurrency 1 unary on the threaded one (the gRPC +
    tritonclient round trip with no work behind it), and the streaming client of table 2 against
    canned answers from the threaded server and from a grpc.aio one (rnnserve-server's kind)."""
    unary: dict = {}
    rows = []
    for aio in (False, True):
        proc, address = start_floor_server(Path(tempfile.mkdtemp(dir=tmp)) / "port", SEQ, aio=aio)
        try:
            if not aio:
                unary = run_load(infer_call(address, np.zeros((1, SEQ), np.int64)), 1, seconds)
            _, secs, client_ms, server_ms = _timed_steps(lambda: stream_sequences(address, tokens, 1, streams),
                                                         proc.pid, tokens.size)
            kind = "grpc.aio floor" if aio else "gRPC floor"
            rows.append((f"{kind}: canned answers, stream x{streams}", secs, 0.0, float("nan"), client_ms, server_ms,
                         0.0))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return unary, rows


def stateless_table(session, address: str, concurrencies: list[int], seconds: float, lone_session=None) -> list:
    """lone_session: a session like the server's for lone runs; at concurrency 1 the in-process loop
    also runs on it (local["lone"]), the fair comparison for a server that runs lone requests there."""
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), size=(1, SEQ), dtype=np.int64)
    feeds = _feeds(session, tokens)
    server_call = infer_call(address, tokens)

    check = server_call()()
    assert np.allclose(check.as_numpy("logits"), session.run(["logits"], feeds)[0], atol=1e-3, rtol=0), \
        "outputs differ"
    rows = []
    for c in concurrencies:
        local = run_load(lambda: (lambda: session.run(None, feeds)), c, seconds)
        if c == 1 and lone_session is not None:
            local["lone"] = run_load(lambda: (lambda: lone_session.run(None, feeds)), c, seconds)
        batched = batched_load(session, c, seconds)
        runs0, rows0, _ = _runs_and_rows(address)
        served = run_load(server_call, c, seconds)
        runs1, rows1, _ = _runs_and_rows(address)
        served["rows_per_run"] = (rows1 - rows0) / max(1, runs1 - runs0)
        rows.append((c, local, batched, served))
    return rows


# -- table 2: streaming (the client shapes are bench/sequence_clients.py's) ---------------------------
def local_steps(session, tokens: np.ndarray, rows: int) -> np.ndarray:
    """In process, one step of `rows` sequences per onnxruntime run, the state carried by hand;
    -> every sequence's last logits [N, V]."""
    n, steps = tokens.shape
    names = [o.name for o in session.get_outputs()]
    last = []
    for lo in range(0, n, rows):
        feeds = _feeds(session, tokens[lo:lo + rows, :1])
        state = {k: v for k, v in feeds.items() if k != "tokens"}
        for t in range(steps):
            out = dict(zip(names, session.run(None, {"tokens": tokens[lo:lo + rows, t:t + 1], **state})))
            state = {k: out[k.replace("0", "n")] for k in state}
        last.append(out["logits"][:, -1])
    return np.concatenate(last)


def _timed_steps(run: Callable[[], np.ndarray], pid: int, steps: int):
    """run() -> (its result, seconds, client CPU ms per step, server (pid) CPU ms per step)."""
    cpu0, server0, t0 = own_cpu_s(), process_cpu_s(pid), time.perf_counter()
    out = run()
    secs = time.perf_counter() - t0
    return (out, secs, (own_cpu_s() - cpu0) * 1e3 / steps, (process_cpu_s(pid) - server0) * 1e3 / steps)


def streaming_rows(address: str, pid: int, tokens: np.ndarray, ref: np.ndarray, streams: int,
                   tag: str, session, many_rows: bool = False) -> list:
    """The client shapes against one server -> [(label, seconds, rows per run, max |dlogit|,
    client CPU ms per step, server CPU ms per step, onnxruntime's share of it (ort_cpu_ms on
    `session`))]. many_rows: also one client sending every sequence as a row of each request,
    unary and streamed."""
    rows = []
    shapes = [("unary", lambda base: unary_sequences(address, tokens, base)),
              (f"stream x{streams}", lambda base: stream_sequences(address, tokens, base, streams))]
    if many_rows:
        n = tokens.shape[0]
        shapes += [(f"{n} rows/request, unary", lambda base: row_sequences(address, tokens, base, False)),
                   (f"{n} rows/request, stream x1", lambda base: row_sequences(address, tokens, base, True))]
    for mode, fn in shapes:
        runs0, rows0, sizes0 = _runs_and_rows(address)
        base = 1_000_000 * (len(rows) + 1)
        last, secs, client_ms, server_ms = _timed_steps(lambda: fn(base), pid, tokens.size)
        runs1, rows1, sizes1 = _runs_and_rows(address)
        sizes = {b: n - sizes0.get(b, 0) for b, n in sizes1.items() if n > sizes0.get(b, 0)}
        rows.append((f"{tag}, {mode}", secs, (rows1 - rows0) / max(1, runs1 - runs0),
                     float(np.abs(last - ref).max()), client_ms, server_ms, ort_cpu_ms(session, sizes, tokens.size)))
    return rows


# -- table 3: prefix resend vs server-side state ------------------------------------------------------
def prefix_vs_state(address: str, n: int, seed: int) -> tuple[float, float, float]:
    tokens = np.random.default_rng(seed).integers(0, len(VOCAB), size=(1, n), dtype=np.int64)
    outputs = [tc.InferRequestedOutput("logits")]
    with tc.InferenceServerClient(address) as client:
        t0 = time.perf_counter()
        for t in range(1, n + 1):
            naive = client.infer(MODEL, [tokens_input(tokens[:, :t])], outputs=outputs)
        naive_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for t in range(n):
            carried = client.infer(MODEL, [tokens_input(tokens[:, t:t + 1])], outputs=outputs,
                                   sequence_id=424242, sequence_start=t == 0, sequence_end=t == n - 1)
        carry_s = time.perf_counter() - t0
    diff = np.abs(naive.as_numpy("logits")[0, -1] - carried.as_numpy("logits")[0, -1]).max()
    return naive_s, carry_s, float(diff)


# -- main -------------------------------------------------------------------------------------------
def _with_server(repo: str, tmp: str, threads: int, extra: list[str], work: Callable[[str, int], object]):
    """work(address, server pid) against `rnnserve-server` started with the extra flags."""
    proc, address = start_server(repo, threads, Path(tempfile.mkdtemp(dir=tmp)) / "port", extra)
    try:
        return work(address, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per stateless measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="client concurrencies of table 1 (stateless requests)")
    parser.add_argument("--sequences", type=int, default=64, help="concurrent sequences of table 2")
    parser.add_argument("--steps", type=int, default=256, help="single-token steps per sequence")
    parser.add_argument("--streams", type=int, default=4, help="tritonclient streams (table 2)")
    parser.add_argument("--prefix", type=int, default=256, help="n of table 3")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads, both sides (0 = the server's default flags; in "
                             "process, the thread count the server chooses for this machine)")
    parser.add_argument("--max-queue-delay-us", type=int, default=500, help="the server's flag of that name")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="server and in-process")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    n, steps = args.sequences, args.steps
    seq_tokens = np.random.default_rng(1).integers(0, len(VOCAB), size=(n, steps), dtype=np.int64)
    common = ["--max-queue-delay-us", str(args.max_queue_delay_us), "--device", args.device]
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        path = os.path.join(repo, MODEL, "1", "model.onnx")
        session = create_session(path, providers_for(args.device), args.device,
                                 intra_op_threads=local_thread_count(args.threads))
        lone_threads = machine_threading(machine_cores()).lone
        lone_session = create_session(path, providers_for(args.device), args.device, intra_op_threads=lone_threads,
                                      lone=True) if args.device == "cpu" and not args.threads else None
        local_runs = []   # in-process context rows: (rows per run, seconds)
        for rows in (1, n):
            t0 = time.perf_counter()
            ref = local_steps(session, seq_tokens, rows)
            local_runs.append((rows, time.perf_counter() - t0))

        def batched_server(address: str, pid: int):
            return (stateless_table(session, address, args.concurrency, args.seconds, lone_session),
                    streaming_rows(address, pid, seq_tokens, ref, args.streams, f"server, max batch {n}",
                                   session, many_rows=True),
                    prefix_vs_state(address, args.prefix, seed=2))

        stateless, streaming, prefix = _with_server(
            repo, tmp, args.threads, common + ["--max-batch-size", str(max(n, max(args.concurrency)))],
            batched_server)
        streaming = _with_server(
            repo, tmp, args.threads, common + ["--max-batch-size", "1"],
            lambda address, pid: streaming_rows(address, pid, seq_tokens, ref, args.streams,
                                                "server, max batch 1", session)
        ) + streaming
        floor, floor_streams = floor_runs(tmp, args.seconds, seq_tokens, args.streams)
        streaming += floor_streams
    print_report(args, stateless, floor, streaming, local_runs, prefix, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
