"""PyTorch eager vs onnxruntime latency for the LSTM char model (not a test; prints one table).

    python -m bench.bench_latency [--threads 1] [--runs 200] [--warmup 20]   (from the repo root)

Model: vocab 65, embedding 64, LSTM hidden 256 x 2 layers, random weights, exported
with export/ (the same graph the server loads).  Both runtimes get the same thread
count.  Latency is the median wall time of one forward call after warm-up.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.contract import INPUT_TOKENS
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.parity import make_session
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.model import CharRNN, ModelConfig

CONFIG = ModelConfig(arch="lstm", vocab_size=65, encoding="embedding", emb_size=64, hidden_size=256, num_layers=2)
CASES = (("batch 1 x seq 64", 1, 64), ("batch 32 x seq 64", 32, 64), ("stream step (seq 1 + state)", 1, 1))


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--runs", type=int, default=200, help="timed runs per case (the median is shown)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs first")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = CharRNN(CONFIG).eval()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = f"{tmp}/checkpoint.pt"
        vocab = [chr(32 + i) for i in range(CONFIG.vocab_size)]
        save_checkpoint(ckpt, model, vocab, {"task": "bench", "seq_len": 64}, {})
        onnx_path = export_checkpoint(ckpt, f"{tmp}/onnx", gate=False).onnx_path
        sess = make_session(onnx_path, threads=args.threads)

        rows = []
        for label, batch, seq in CASES:
            tokens = rng.integers(0, CONFIG.vocab_size, (batch, seq), dtype=np.int64)
            h0, c0 = (rng.standard_normal(CONFIG.state_shape(batch)).astype(np.float32) for _ in range(2))
            t_tokens, t_state = torch.from_numpy(tokens), (torch.from_numpy(h0), torch.from_numpy(c0))
            feeds = {INPUT_TOKENS: tokens, "h0": h0, "c0": c0}

            def run_torch():
                with torch.inference_mode():
                    return model(t_tokens, t_state)

            t_ms = median_ms(run_torch, args.runs, args.warmup)
            o_ms = median_ms(lambda: sess.run(None, feeds), args.runs, args.warmup)
            rows.append((label, t_ms, o_ms, t_ms / o_ms))

    print(f"LSTM char model (vocab 65, emb 64, hidden 256 x 2), threads={args.threads} (torch and onnxruntime), "
          f"median of {args.runs} runs after {args.warmup} warm-up; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")
    print(f"| {'case':<28} | {'torch ms':>9} | {'ort ms':>9} | {'speedup':>7} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 11}|{'-' * 9}|")
    for label, t_ms, o_ms, speedup in rows:
        print(f"| {label:<28} | {t_ms:>9.3f} | {o_ms:>9.3f} | {speedup:>6.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
