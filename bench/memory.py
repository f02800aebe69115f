"""Peak memory per request, and memory returned afterwards, of a real `rnnserve-server`.

    python -m bench.memory [--threads 2] [--max-run-bytes N]   # repo root; Linux (reads /proc)

The cases: stateless requests for the logits or the final state only, then the same as
sequence steps with a step id (a START that leaves its state on the server, a START + END;
the answer each reads is kept for a retry), an invalid one and one over the message limit.
For each case it resets the server process's peak resident size (/proc/PID/clear_refs),
sends one request, and reads the peak (VmHWM) and, after an idle second or two, the
resident size (VmRSS). It prints, per case: request and response bytes, the peak rise
over the resident size before the request, that rise divided by request + response
bytes, and the resident size left above the starting point once idle (serve/memory.py
returns freed memory with malloc_trim). The model is a small GRU (vocab 8, hidden 8), so
tens of MB of tokens run in seconds and the figures are the server's own overhead.
--max-run-bytes is passed to the server (0: runs are never split in time chunks, as
before serve/engine/chunking.py), so the two can be compared.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from bench.bench_server import start_server
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.model import CharRNN, ModelConfig

MiB = 2**20
IDLE_S = float(os.environ.get("IDLE_S", "2"))
MODEL = "tiny"
VOCAB = list("abcdefgh")
# sequence steps with a step id, so the answer read is kept for a retry: a START (its state stays on the
# server) and a START + END
SEQ_START = {"sequence_id": "bench-state", "sequence_start": True, "sequence_step": 0}
SEQ_ONCE = {"sequence_id": "bench-once", "sequence_start": True, "sequence_end": True, "sequence_step": 0}
# (name, rows, seq, outputs, gzip, valid, parameters)
CASES = [
    ("logits", 1000, 1000, ["logits"], False, True, {}),
    ("state only", 6000, 1000, ["hn"], False, True, {}),
    ("state only, gzip", 6000, 1000, ["hn"], True, True, {}),
    ("sequence START, state", 6000, 1000, ["hn"], False, True, SEQ_START),
    ("sequence START+END, logits", 1000, 1000, ["logits"], False, True, SEQ_ONCE),
    ("invalid token id", 6000, 1000, ["hn"], False, False, {}),
    ("over --max-message-bytes", 10000, 1000, ["hn"], False, True, {}),
    ("logits again", 1000, 1000, ["logits"], False, True, {}),
]


def build_repository(root: str) -> str:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(arch="gru", vocab_size=len(VOCAB), encoding="embedding", emb_size=4,
                                hidden_size=8, num_layers=1)).eval()
    ckpt = os.path.join(root, "ckpt", "checkpoint.pt")
    save_checkpoint(ckpt, model, VOCAB, {"task": "charlm", "seq_len": 16}, {})
    repo = os.path.join(root, "repo")
    export_checkpoint(ckpt, os.path.join(repo, MODEL, "1"), gate=False, threads=1)
    return repo


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def run_case(stub, pid: int, rows: int, seq: int, outputs, gzip: bool, valid: bool, parameters: dict) -> dict:
    rng = np.random.default_rng(rows)
    tokens = rng.integers(0, len(VOCAB), size=(rows, seq), dtype=np.int64)
    if not valid:
        tokens[-1, -1] = len(VOCAB) + 5
    request = convert.infer_request_to_proto(MODEL, {"tokens": tokens}, outputs=outputs, parameters=parameters)
    before = _status(pid)["VmRSS"]
    _reset_peak(pid)
    code, answer_bytes = "OK", 0
    t0 = time.perf_counter()
    try:
        answer = stub.ModelInfer(request, timeout=600,
                                 compression=grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression)
        answer_bytes = answer.ByteSize()
    except grpc.RpcError as err:
        code = err.code().name
    seconds = time.perf_counter() - t0
    peak = _status(pid)["VmHWM"]
    time.sleep(IDLE_S)
    idle = _status(pid)["VmRSS"]
    rise = max(peak - before, 0)
    return {"code": code, "request": request.ByteSize(), "response": answer_bytes, "rise": rise,
            "ratio": rise / (request.ByteSize() + answer_bytes), "idle": idle, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default %(default)s)")
    parser.add_argument("--max-run-bytes", type=int, default=None,
                        help="the server's --max-run-bytes (default: the server's default)")
    args = parser.parse_args(argv)
    run_flags = [] if args.max_run_bytes is None else ["--max-run-bytes", str(args.max_run_bytes)]
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        proc, address = start_server(repo, args.threads, Path(tmp) / "port",
                                     ["--max-batch-size", "10000", "--max-seq-len", "1000", *run_flags])
        try:
            with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                         ("grpc.max_receive_message_length", -1)]) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                time.sleep(IDLE_S)
                start = _status(proc.pid)["VmRSS"]
                print(f"server resident at start: {start / MiB:.0f} MiB")
                print(f"{'case':<28}{'status':<20}{'request MB':>11}{'response MB':>12}{'peak +MB':>10}"
                      f"{'peak/(req+resp)':>16}{'idle +MB':>10}{'seconds':>9}")
                for name, *case in CASES:
                    r = run_case(stub, proc.pid, *case)
                    print(f"{name:<28}{r['code']:<20}{r['request'] / 1e6:>11.1f}{r['response'] / 1e6:>12.1f}"
                          f"{r['rise'] / 1e6:>10.0f}{r['ratio']:>16.1f}{(r['idle'] - start) / 1e6:>10.0f}"
                          f"{r['seconds']:>9.2f}")
        finally:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
