"""Server vs in-process onnxruntime, side by side in one run.

    python -m bench.bench_server [--seconds 5] [--concurrency 1 8] [--rounds 3] [--threads 1]   # repo root

The model is the 2-layer LSTM char model (vocab 65, emb 64, hidden 256) with random
weights, exported by our export code into a temporary repository. The load is batch
1, seq 64. For each concurrency C it measures, for the same duration:
  * in-process: C threads calling one onnxruntime session (made by
    serve.runtime.create_session, so the options equal the server's shared session) in a
    loop. At concurrency 1 the server runs the request on its lone-run session (more
    threads: serve/engine/batching.py); bench_batching also times the loop on such a session;
  * server: `rnnserve-server` as a subprocess on 127.0.0.1 and C threads, each with
    its own tritonclient.grpc client, calling infer() in a loop.
It prints p50/p99 latency, throughput, and the server/in-process throughput ratio.

Triton's own load tool works against the same server (it calls ModelMetadata,
ModelConfig, ServerMetadata, ModelStatistics, then ModelInfer). It needs Debian's
libb64-0d and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel:

    apt-get install -y libb64-0d
    pip download --no-deps nvidia-cuda-runtime-cu12 -d /tmp/w && unzip -q -d /tmp/cudart /tmp/w/*.whl
    export LD_LIBRARY_PATH=/tmp/cudart/nvidia/cuda_runtime/lib:$LD_LIBRARY_PATH
    rnnserve-server --repository REPO --port 8001 --threads 1 &
    .venv/bin/perf_analyzer -m charlm -u 127.0.0.1:8001 -i grpc --input-data bench/perf_analyzer/tokens.json \\
        --concurrency-range 8

Streamable models report sequence_batching in ModelConfig, so perf_analyzer runs its
sequence mode; their state inputs are `optional` and must be left out (the server
keeps the state), which only a JSON data file can say: with `--input-data zero
--shape tokens:1,64` it stops with "input c0 contains dynamic shape", and with
--shape h0/c0 too it sends states on every step, which the server refuses after
START. Models without state (bidirectional) take the plain
`--input-data zero --shape tokens:1,64`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as tc

from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.serve.engine.runtime import CPU, CUDA, create_session
from rnnserve.serve.settings import machine_cores, machine_threading
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.model import CharRNN, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
MODEL = "charlm"
VOCAB = [chr(c) for c in range(32, 97)]          # 65 characters
BATCH, SEQ = 1, 64


def build_repository(root: str) -> str:
    """Random-weight 2-layer LSTM (vocab 65, emb 64, hidden 256) -> root/repo/charlm/1/model.onnx."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(arch="lstm", vocab_size=len(VOCAB), encoding="embedding",
                                emb_size=64, hidden_size=256, num_layers=2)).eval()
    ckpt = os.path.join(root, "ckpt", "checkpoint.pt")
    save_checkpoint(ckpt, model, VOCAB, {"task": "charlm", "seq_len": SEQ}, {})
    repo = os.path.join(root, "repo")
    export_checkpoint(ckpt, os.path.join(repo, MODEL, "1"), gate=False, threads=1)
    return repo


def start_server(repo: str, threads: int, port_file: Path,
                 extra_args: Sequence[str] = (), device: str = "cpu") -> tuple[subprocess.Popen, str]:
    """`rnnserve-server` on a free port (threads 0: its default threading; extra_args: more flags);
    -> (process, "127.0.0.1:PORT")."""
    thread_flags = ["--threads", str(threads)] if threads > 0 else []   # 0: the server's default
    proc = subprocess.Popen([sys.executable, "-m", "rnnserve.serve", "--repository", repo, "--port", "0",
                             "--device", device, *thread_flags, "--port-file",
                             str(port_file), "--log-level", "WARNING", *extra_args],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("rnnserve listening on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def providers_for(device: str) -> list[str]:
    return [CUDA, CPU] if device == "cuda" else [CPU]


def local_thread_count(threads: int) -> int:
    """The in-process side's intra-op threads: as given, or for 0 what the server chooses here."""
    return threads or machine_threading(machine_cores()).threads


def run_load(make_call, concurrency: int, seconds: float) -> dict:
    """C threads, each calling its own `make_call()` result in a loop for `seconds`."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    calls = [make_call() for _ in range(concurrency)]
    for call in calls:                       # warm every connection / thread
        for _ in range(5):
            call()
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        start.wait()
        own, call = latencies[i], calls[i]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            call()
            own.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t_begin = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_begin
    flat = np.array([x for own in latencies for x in own]) * 1e3
    return {"n": len(flat), "p50": float(np.percentile(flat, 50)),
            "p99": float(np.percentile(flat, 99)), "rps": len(flat) / elapsed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="client concurrencies")
    parser.add_argument("--rounds", type=int, default=3,
                        help="in-process and server measured alternately this many times per "
                             "concurrency; the table shows the median round (the in-process "
                             "figure alone moves ±10%% from run to run on a small machine)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads, both sides (0 = the server's default flags; "
                             "in process, the thread count the server chooses for this machine)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="both sides")
    args = parser.parse_args(argv)
    local_threads = local_thread_count(args.threads)

    tokens = np.random.default_rng(0).integers(0, len(VOCAB), size=(BATCH, SEQ), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        path = os.path.join(repo, MODEL, "1", "model.onnx")
        session = create_session(path, providers_for(args.device), args.device, intra_op_threads=local_threads)
        feeds = {i.name: (tokens if i.name == "tokens" else
                          np.zeros((i.shape[0], BATCH, i.shape[2]), np.float32))
                 for i in session.get_inputs()}
        proc, address = start_server(repo, args.threads, Path(tmp) / "port", device=args.device)
        try:
            def server_call():
                client = tc.InferenceServerClient(address)
                tensor = tc.InferInput("tokens", [BATCH, SEQ], "INT64")
                tensor.set_data_from_numpy(tokens)
                return lambda: client.infer(MODEL, [tensor])

            def local_call():
                return lambda: session.run(None, feeds)

            check = server_call()().as_numpy("logits")
            assert np.allclose(check, session.run(["logits"], feeds)[0], atol=1e-5 if args.device == "cpu" else 1e-3,
                               rtol=0), "outputs differ"
            rows = []
            for concurrency in args.concurrency:
                rounds = []
                for _ in range(max(1, args.rounds)):
                    local = run_load(local_call, concurrency, args.seconds)
                    served = run_load(server_call, concurrency, args.seconds)
                    rounds.append((served["rps"] / local["rps"], local, served))
                rows.append((concurrency, sorted(rounds, key=lambda r: r[0])))
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    print(f"\nmodel: 2-layer LSTM, vocab {len(VOCAB)}, emb 64, hidden 256; device {args.device}; batch {BATCH}, "
          f"seq {SEQ}; {args.seconds:.0f} s each; cpu cores {os.cpu_count()}; "
          f"intra-op threads: server {args.threads or 'default flags'}, in-process {local_threads}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"{'conc':>4}  {'mode':<10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'ratio':>6}")
    for concurrency, rounds in rows:
        _, local, served = rounds[len(rounds) // 2]      # the median round
        for mode, r in (("in-process", local), ("server", served)):
            ratio = r["rps"] / local["rps"]
            print(f"{concurrency:>4}  {mode:<10} {r['p50']:>8.3f} {r['p99']:>8.3f} "
                  f"{r['rps']:>9.1f} {ratio:>5.2f}x")
    print(f"\nmedian round shown; {len(rows[0][1])} rounds per concurrency, ratio per round:")
    for concurrency, rounds in rows:
        print(f"  conc {concurrency}: " + ", ".join(f"{ratio:.2f}x ({served['rps']:.0f} / {local['rps']:.0f} req/s)"
                                               for ratio, local, served in rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
