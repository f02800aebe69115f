"""In process (no gRPC): streaming sequences with batched steps, and O(1) state carrying.

    python -m bench.bench_engine [--threads 1] [--sequences 64] [--steps 256] [--rounds 3]   (repo root)

Model: the LSTM char model (vocab 65, embedding 64, hidden 256 x 2 layers), random weights,
exported with export/ into a model repository and loaded by serve.DataPlane on CPU.

Table 1 (streaming): N sequences, each sending S single-token steps.
  - unbatched: the same N sequences served one step per onnxruntime call, state carried by
    the caller (one loop, the fastest way to do it without batching);
  - engine, max_batch_size 1: the same threads and machinery as below, with batching off;
  - engine: N client threads, each submitting its next step to the model's SequenceManager
    when the previous one is answered; steps of different sequences share runs (Batcher);
  - dataplane: the same through DataPlane.infer with sequence_id/start/end parameters
    (validation and responses included; what a gRPC handler calls);
  - pipelined: one thread submitting every sequence's next step with DataPlane.infer_async
    (as ModelStreamInfer does), then collecting the answers.
  Aggregate steps/s, the ratio to unbatched, and the process's CPU time per step (all threads):
  the engine's per-step cost in Python (two futures, a thread hand-off each way) is about the
  same on any CPU, while an onnxruntime step gets cheaper on a faster one, so the ratio to
  unbatched shrinks as the CPU gets faster. The modes run in interleaved rounds and each shows
  its best round, so a burst of load from other processes does not land on one mode only.
Table 2 (prefix, best of rounds): one sequence of n tokens, predicted one token at a time: the naive client
  resends the whole prefix each step (n runs of 1..n tokens, O(n^2)) vs state carrying
  (n runs of 1 token, O(n)). Total onnxruntime time and the ratio.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.sequences import SequenceManager
from rnnserve.serve.settings import ServeSettings
from rnnserve.serve.wire.types import InferRequest
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.model import CharRNN, ModelConfig

CONFIG = ModelConfig(arch="lstm", vocab_size=65, encoding="embedding", emb_size=64, hidden_size=256, num_layers=2)
MODEL = "charlstm"


def build_repo(root: str, seed: int) -> str:
    torch.manual_seed(seed)
    ckpt = os.path.join(root, "checkpoint.pt")
    vocab = [chr(32 + i) for i in range(CONFIG.vocab_size)]
    save_checkpoint(ckpt, CharRNN(CONFIG).eval(), vocab, {"task": "bench", "seq_len": 64}, {})
    repo = os.path.join(root, "repo")
    export_checkpoint(ckpt, os.path.join(repo, MODEL, "1"), gate=False)
    return repo


# -- table 1: streaming ---------------------------------------------------------------------------
def unbatched(sess: ort.InferenceSession, tokens: np.ndarray) -> np.ndarray:
    """One onnxruntime call per step per sequence; returns the last logits [N, V]."""
    n, steps = tokens.shape
    zeros = np.zeros(CONFIG.state_shape(1), np.float32)
    state = [(zeros, zeros) for _ in range(n)]
    last = [None] * n
    for t in range(steps):
        for i in range(n):
            logits, hn, cn = sess.run(None, {"tokens": tokens[i:i + 1, t:t + 1], "h0": state[i][0],
                                             "c0": state[i][1]})
            state[i] = (hn, cn)
            last[i] = logits[0, -1]
    return np.stack(last)


def threaded(n: int, client: Callable[[int], np.ndarray]) -> np.ndarray:
    """n client threads released together; returns each one's last logits."""
    last: list[np.ndarray | None] = [None] * n
    gate = threading.Barrier(n)

    def run(i: int) -> None:
        gate.wait()
        last[i] = client(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return np.stack(last)


def engine_client(sequences: SequenceManager, tokens: np.ndarray, tag: str) -> Callable[[int], np.ndarray]:
    steps = tokens.shape[1]

    def client(i: int) -> np.ndarray:
        for t in range(steps):
            out = sequences.submit((tag, i), {"tokens": tokens[i:i + 1, t:t + 1]}, start=t == 0,
                                   end=t == steps - 1).result(timeout=600)
        return out["logits"][0, -1]
    return client


def dataplane_client(dp: DataPlane, tokens: np.ndarray, tag: str) -> Callable[[int], np.ndarray]:
    steps = tokens.shape[1]

    def client(i: int) -> np.ndarray:
        for t in range(steps):
            req = InferRequest(model_name=MODEL, inputs={"tokens": tokens[i:i + 1, t:t + 1]},
                               requested_outputs=["logits"],
                               parameters={"sequence_id": f"{tag}{i}", "sequence_start": t == 0,
                                           "sequence_end": t == steps - 1})
            out = dp.infer(req)
        return out.outputs[0][1][0, -1]
    return client


def pipelined(dp: DataPlane, tokens: np.ndarray, first_id: int) -> np.ndarray:
    n, steps = tokens.shape
    last = None
    for t in range(steps):
        futs = [dp.infer_async(InferRequest(
            model_name=MODEL, inputs={"tokens": tokens[i:i + 1, t:t + 1]}, requested_outputs=["logits"],
            parameters={"sequence_id": first_id + i, "sequence_start": t == 0, "sequence_end": t == steps - 1}))
            for i in range(n)]
        last = np.stack([f.result(timeout=600).outputs[0][1][0, -1] for f in futs])
    return last


def timed(fn: Callable[[], np.ndarray]):
    """(wall seconds, CPU seconds of the whole process, fn's result)"""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


# -- table 2: prefix resend vs state carry ----------------------------------------------------------
def prefix_vs_state(sess: ort.InferenceSession, tokens: np.ndarray):
    """(naive seconds, carried seconds, max |logit diff|) over len(tokens) steps."""
    n = tokens.shape[1]
    zeros = np.zeros(CONFIG.state_shape(1), np.float32)
    naive_s = carry_s = 0.0
    naive_last = carry_last = None
    for t in range(1, n + 1):
        t0 = time.perf_counter()
        logits, _, _ = sess.run(None, {"tokens": tokens[:, :t], "h0": zeros, "c0": zeros})
        naive_s += time.perf_counter() - t0
        naive_last = logits[0, -1]
    h, c = zeros, zeros
    for t in range(n):
        t0 = time.perf_counter()
        logits, h, c = sess.run(None, {"tokens": tokens[:, t:t + 1], "h0": h, "c0": c})
        carry_s += time.perf_counter() - t0
        carry_last = logits[0, -1]
    return naive_s, carry_s, float(np.abs(naive_last - carry_last).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--sequences", type=int, default=64, help="concurrent sequences (one client thread each)")
    p.add_argument("--steps", type=int, default=256, help="single-token steps per sequence")
    p.add_argument("--max-batch-size", type=int, default=64, help="the engine's rows per onnxruntime run, at most")
    p.add_argument("--max-queue-delay-us", type=int, default=500, help="the batcher's wait for more rows, at most")
    p.add_argument("--prefix-lengths", default="64,128,256", help="sequence lengths of table 2")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each mode's best is shown")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, args.threads))

    rng = np.random.default_rng(args.seed)
    n, steps = args.sequences, args.steps
    tokens = rng.integers(0, CONFIG.vocab_size, (n, steps), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        settings = ServeSettings(repository=build_repo(tmp, args.seed), device="cpu",
                                 intra_op_threads=args.threads, max_batch_size=args.max_batch_size,
                                 max_queue_delay_us=args.max_queue_delay_us, max_sequences=4 * n)
        dp = DataPlane(settings)
        dp.load()
        try:
            engine = dp.engine(MODEL)
            inst = engine.inst
            single_runs: list = []      # the RunRecords of the max_batch_size 1 batcher
            single = Batcher("unbatched", inst.run, engine.io, max_batch_size=1, on_run=single_runs.append)

            def run_count() -> int:
                return engine.counters.snapshot().execution_count + len(single_runs)
            single_seqs = SequenceManager("unbatched", single, engine.io, engine.zero_states, max_sequences=n)
            modes = (
                ("unbatched (1 step per ort call)", lambda r: unbatched(inst.session, tokens)),
                ("engine, max_batch_size 1", lambda r: threaded(n, engine_client(single_seqs, tokens, f"u{r}"))),
                ("engine (SequenceManager+Batcher)",
                 lambda r: threaded(n, engine_client(engine.sequences, tokens, f"e{r}"))),
                ("dataplane (DataPlane.infer)", lambda r: threaded(n, dataplane_client(dp, tokens, f"d{r}"))),
                ("pipelined (DataPlane.infer_async)", lambda r: pipelined(dp, tokens, 1000 * (r + 1))))
            # Rounds interleave the modes so that load from other processes hits them all; best of rounds.
            best = {label: (float("inf"), 0.0, 0, 0.0) for label, _ in modes}
            ref = None
            for r in range(args.rounds):
                for label, fn in modes:
                    runs0 = run_count()
                    secs, cpu, last = timed(lambda: fn(r))
                    ref = last if ref is None else ref
                    runs = run_count() - runs0 if label != modes[0][0] else n * steps
                    if secs < best[label][0]:
                        best[label] = (secs, cpu, runs, float(np.abs(last - ref).max()))
            rows = [(label, *best[label]) for label, _ in modes]
            base_s = rows[0][1]
            single_seqs.close()
            single.close()

            prefix_rows = []
            for length in (int(x) for x in args.prefix_lengths.split(",")):
                seq = rng.integers(0, CONFIG.vocab_size, (1, length), dtype=np.int64)
                trials = [prefix_vs_state(inst.session, seq) for _ in range(args.rounds)]
                prefix_rows.append((length, min(t[0] for t in trials), min(t[1] for t in trials),
                                    max(t[2] for t in trials)))
        finally:
            dp.close()

    total = n * steps
    print(f"LSTM char model (vocab 65, emb 64, hidden 256 x 2), CPU, onnxruntime {ort.__version__}, "
          f"intra-op threads {args.threads}, max_batch_size {args.max_batch_size}, "
          f"max_queue_delay_us {args.max_queue_delay_us}; {os.cpu_count()} CPUs (shared: numbers are noisy)")
    print(f"\nStreaming: {n} sequences x {steps} single-token steps = {total} steps")
    print(f"| {'mode':<34} | {'seconds':>8} | {'steps/s':>9} | {'ort runs':>8} | {'rows/run':>8} "
          f"| {'vs unbatched':>12} | {'CPU us/step':>11} | {'max |dlogit|':>12} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 13}|{'-' * 14}|")
    for label, secs, cpu, runs, diff in rows:
        print(f"| {label:<34} | {secs:>8.2f} | {total / secs:>9.0f} | {runs:>8} | {total / runs:>8.1f} "
              f"| {base_s / secs:>11.2f}x | {cpu / total * 1e6:>11.1f} | {diff:>12.2e} |")
    print("\nNaive client (resend the whole prefix each step) vs server-side state (one new token per step)")
    print(f"| {'n':>5} | {'naive ort s':>11} | {'carried ort s':>13} | {'ratio':>8} | {'max |dlogit|':>12} |")
    print(f"|{'-' * 7}|{'-' * 13}|{'-' * 15}|{'-' * 10}|{'-' * 14}|")
    for length, naive_s, carry_s, diff in prefix_rows:
        print(f"| {length:>5} | {naive_s:>11.3f} | {carry_s:>13.3f} | {naive_s / carry_s:>7.1f}x | {diff:>12.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
