"""Time per long request with and without time chunks (serve/engine/chunking.py).

    python -m bench.chunks [--repeats 3]        # repo root

The bench model (bench/bench_server.py: a 2-layer LSTM, vocab 65, hidden 256) in three
data planes side by side, differing only in --max-run-bytes: 0 (whole runs), the default
and a larger budget. Each long request goes to each plane in turn, `--repeats` times; the
table gives the best time of each and the number of onnxruntime runs one request took.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from bench.bench_server import MODEL, VOCAB, build_repository
from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.settings import ServeSettings
from rnnserve.serve.wire.types import InferRequest

MiB = 2**20
BUDGETS = (0, ServeSettings(repository="").max_run_bytes, 128 * MiB)
CASES = [  # (rows, steps, requested outputs: None = all)
    (32, 2048, None),
    (32, 2048, ["hn", "cn"]),
    (1, 8192, None),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="requests per case and plane (default %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        planes = {b: DataPlane(ServeSettings(repository=repo, device="cpu", intra_op_threads=1, max_seq_len=8192,
                                             warmup=False, max_run_bytes=b)) for b in BUDGETS}
        for plane in planes.values():
            plane.load()
        try:
            print(f"{'rows x steps':<14}{'outputs':<10}" + "".join(f"{f'{b // MiB} MiB: s':>12}{'runs':>6}"
                                                                 for b in BUDGETS))
            for rows, steps, outputs in CASES:
                tokens = np.random.default_rng(0).integers(0, len(VOCAB), (rows, steps), dtype=np.int64)
                best, runs = {}, {}
                for _ in range(args.repeats):
                    for budget, plane in planes.items():
                        before = plane.model_statistics(MODEL)[0].execution_count
                        t0 = time.perf_counter()
                        plane.infer(InferRequest(model_name=MODEL, inputs={"tokens": tokens},
                                                 requested_outputs=outputs))
                        best[budget] = min(best.get(budget, float("inf")), time.perf_counter() - t0)
                        runs[budget] = plane.model_statistics(MODEL)[0].execution_count - before
                print(f"{f'{rows} x {steps}':<14}{'all' if outputs is None else 'state':<10}"
                      + "".join(f"{best[b]:>12.3f}{runs[b]:>6}" for b in BUDGETS))
        finally:
            for plane in planes.values():
                plane.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
