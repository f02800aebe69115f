"""The GPU check's Python half (scripts/gpu_check.sh runs it in the onnxruntime-gpu venv).

    python -m bench.gpu_check [--device cuda]

Builds bench.bench_server's model repository, starts `rnnserve-server --device DEVICE` and
`rnnserve-server --device cpu` on free ports, then checks:
  1. providers: the DEVICE server's ServerMetadata announces onnxruntime_provider:CUDAExecutionProvider
     (for --device cuda; for cpu, CPUExecutionProvider only), and its start-up logged the same;
  2. answers: the same requests to both servers agree within --atol: stateless batches
     (1 x 64, 8 x 17), a 32-step sequence and a many-sequence request (16 rows x 8 steps).
Exit status 0 when every check passes. `--device cpu` runs the same checks CPU against CPU
(what can be tested without a GPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc

from bench.bench_server import MODEL, VOCAB, build_repository, start_server


def _input(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def requests(rng: np.random.Generator):
    """(label, list of (inputs, infer kwargs)) — each list is sent in order to one server."""
    for shape in ((1, 64), (8, 17)):
        tokens = rng.integers(0, len(VOCAB), size=shape, dtype=np.int64)
        yield f"stateless {shape[0]} x {shape[1]}", [([_input("tokens", tokens, "INT64")], {})]
    steps = rng.integers(0, len(VOCAB), size=32, dtype=np.int64)
    yield "sequence, 32 steps", [([_input("tokens", np.array([[t]]), "INT64")],
                                  dict(sequence_id=7, sequence_start=i == 0, sequence_end=i == 31))
                                 for i, t in enumerate(steps)]
    ids = np.arange(100, 116, dtype=np.uint64)
    rows = rng.integers(0, len(VOCAB), size=(16, 8), dtype=np.int64)
    yield "16 sequences per request, 8 steps", [
        ([_input("tokens", rows[:, i:i + 1], "INT64"), _input("sequence_id", ids, "UINT64"),
          _input("sequence_start", np.full(16, i == 0), "BOOL"), _input("sequence_end", np.full(16, i == 7), "BOOL")],
         {}) for i in range(8)]


def answers(address: str, calls) -> list[np.ndarray]:
    with tc.InferenceServerClient(address) as client:
        return [client.infer(MODEL, inputs, **kwargs).as_numpy("logits") for inputs, kwargs in calls]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="the device under test, checked against a CPU server")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest |logit difference| allowed")
    args = parser.parse_args(argv)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        device, device_address = start_server(repo, 0, Path(tmp) / "port-device", device=args.device)
        cpu, cpu_address = start_server(repo, 0, Path(tmp) / "port-cpu", device="cpu")
        try:
            with tc.InferenceServerClient(device_address) as client:
                providers = sorted(e.split(":", 1)[1] for e in client.get_server_metadata().extensions
                                   if e.startswith("onnxruntime_provider:"))
            want = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
            ok = want in providers and (args.device == "cuda" or providers == [want])
            print(f"providers of the --device {args.device} server: {', '.join(providers)}: {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append("providers")
            rng = np.random.default_rng(0)
            for label, calls in requests(rng):
                got, want_ = answers(device_address, calls), answers(cpu_address, calls)
                diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want_))
                ok = diff <= args.atol
                print(f"{label:<36} max |logit {args.device} - cpu| {diff:.2e} <= {args.atol:g}: "
                      f"{'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append(label)
        finally:
            for proc in (device, cpu):
                proc.terminate()
                proc.wait(timeout=60)
    print("GPU check: " + ("PASS" if not failures else "FAIL: " + ", ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
