"""The server's own CPU per streamed step, without gRPC: the data plane as the event loop drives it.

    python -m bench.dataplane_steps [--rows 1 2 4 8 16] [--steps 400]    # repo root

One process, one thread, no gRPC and no thread hand-off: the bench model
(bench_server.build_repository: the 2-layer LSTM char model) in a DataPlane with the
server's default settings, fed R live sequences one token at a time the way the asyncio
front end feeds it (serve/frontend/servicers.py): for each step, every sequence's
serialized ModelInferRequest is parsed and converted (serve/wire/convert.py), submitted
with the model's batcher held (DataPlane.submit, the Coalescer's hold), the hold is
released on this thread (Batcher.release(here=True): the quick run on the event loop),
and each answer is built and serialized as a ModelStreamInferResponse. It prints, per step
and for each R (rows per onnxruntime run), the CPU time of the whole process, onnxruntime's
part of it (process CPU time across each session run), and the rest: what rnnserve-server
adds per step to the gRPC floor (bench.floor) besides its threads' hand-offs.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time

import numpy as np

from bench.bench_server import MODEL, VOCAB, build_repository
from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.settings import ServeSettings, with_machine_defaults
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb

WARMUP_STEPS = 20


class TimedSession:
    """A session whose runs' process CPU time is summed."""

    def __init__(self, session):
        self.session, self.cpu_ns = session, 0

    def run(self, *args, **kwargs):
        t0 = time.process_time_ns()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.cpu_ns += time.process_time_ns() - t0


def step_request(seq_id: int, start: bool, token: int) -> bytes:
    """One single-token step of a sequence, serialized as a client sends it."""
    r = pb.ModelInferRequest(model_name=MODEL, id=f"{seq_id}-{token}")
    r.parameters["sequence_id"].int64_param = seq_id
    r.parameters["sequence_start"].bool_param = start
    r.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    r.raw_input_contents.append(np.array([[token]], np.int64).tobytes())
    r.outputs.add(name="logits")
    return r.SerializeToString()


class Hold:
    """The Coalescer's part: the first request of a round holds the model's batcher."""

    def __init__(self) -> None:
        self.held = None

    def __call__(self, batcher) -> None:
        if self.held is None:
            batcher.hold()
            self.held = batcher

    def release(self) -> None:
        self.held.release(here=True)
        self.held = None


def one_round(dp: DataPlane, hold: Hold, bodies: list[bytes]) -> list[bytes]:
    pending = [dp.submit(convert.infer_request_from_proto(pb.ModelInferRequest.FromString(body), None, None),
                         hold=hold) for body in bodies]
    hold.release()
    answers = []
    for p in pending:
        answer = pb.ModelStreamInferResponse()
        convert.infer_response_to_proto(p.respond(p.raw.result()), answer.infer_response)
        answers.append(answer.SerializeToString())
    return answers


def measure(repo: str, rows: int, steps: int) -> tuple[float, float]:
    """-> (process CPU µs per step, onnxruntime's µs of it) for `rows` sequences stepped together."""
    dp = DataPlane(with_machine_defaults(ServeSettings(repository=repo, device="cpu", max_batch_size=64)))
    dp.load()
    try:
        inst = dp.engine(MODEL).inst
        timed = TimedSession(inst.session)
        inst.session = timed
        tokens = np.random.default_rng(rows).integers(0, len(VOCAB), size=(steps, rows))
        bodies = [[step_request(1000 + s, t == 0, int(tokens[t, s])) for s in range(rows)] for t in range(steps)]
        hold = Hold()
        for t in range(WARMUP_STEPS):
            one_round(dp, hold, bodies[t])
        gc.collect()
        timed.cpu_ns, cpu0 = 0, time.process_time_ns()
        for t in range(WARMUP_STEPS, steps):
            one_round(dp, hold, bodies[t])
        n = (steps - WARMUP_STEPS) * rows
        return (time.process_time_ns() - cpu0) / n / 1e3, timed.cpu_ns / n / 1e3
    finally:
        dp.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="sequences stepped together: rows per onnxruntime run")
    parser.add_argument("--steps", type=int, default=400, help=f"steps per sequence ({WARMUP_STEPS} of them warm-up)")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        print("| rows per run | CPU µs per step | onnxruntime | outside onnxruntime |")
        print("|---:|---:|---:|---:|")
        for rows in args.rows:
            total, ort = measure(repo, rows, args.steps)
            print(f"| {rows} | {total:.1f} | {ort:.1f} | {total - ort:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
