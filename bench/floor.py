"""The cost of the gRPC front end alone: a server that answers every ModelInfer with a canned
response, and CPU-time accounting for the benchmark tables.

    python -m bench.floor --port-file PATH [--seq 64] [--aio [--event-loop auto]]    # serve until SIGTERM

The canned response has the shape and size of the real one (logits [1, seq, 65] as FP32 raw
contents), so tritonclient does the same work on it as on a real answer; ModelStreamInfer
answers every streamed request at once with a canned single-step answer. Its round trip, measured
with the same client, is the floor under any Python gRPC server on this machine: the latency
goal at concurrency 1 (server p50 within 0.5 ms of in-process) cannot be met where this floor
alone exceeds 0.5 ms. With --aio the same answers come from a grpc.aio server (one event loop,
as rnnserve-server's front end, on the same kind of loop): the floor under a Python asyncio gRPC server.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from rnnserve.serve.eventloop import EVENT_LOOPS, new_event_loop
from rnnserve.serve.grpc_core import EXPERIMENTS_ENV, server_experiments
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc

VOCAB_SIZE = 65


class CannedInference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, seq: int):
        self._response = pb.ModelInferResponse(model_name="charlm", model_version="1")
        self._response.outputs.add(name="logits", datatype="FP32", shape=[1, seq, VOCAB_SIZE])
        self._response.raw_output_contents.append(np.zeros(seq * VOCAB_SIZE, np.float32).tobytes())
        self._step = np.zeros(VOCAB_SIZE, np.float32).tobytes()

    def ModelInfer(self, request, context):
        return self._response

    def ModelStreamInfer(self, request_iterator, context):
        """One canned single-step answer (logits [1, 1, 65]) per request, carrying its id."""
        for request in request_iterator:
            yield self._stream_answer(request)

    def _stream_answer(self, request) -> pb.ModelStreamInferResponse:
        answer = pb.ModelInferResponse(model_name="charlm", model_version="1", id=request.id)
        answer.outputs.add(name="logits", datatype="FP32", shape=[1, 1, VOCAB_SIZE])
        answer.raw_output_contents.append(self._step)
        return pb.ModelStreamInferResponse(infer_response=answer)


class CannedInferenceAio(CannedInference):
    """The same canned answers from coroutines, for a grpc.aio server."""

    async def ModelInfer(self, request, context):  # type: ignore[override]
        return self._response

    async def ModelStreamInfer(self, request_iterator, context):  # type: ignore[override]
        async for request in request_iterator:
            yield self._stream_answer(request)


def stat_cpu_s(stat: str) -> float:
    """User + system CPU seconds in the text of a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat file."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (from /proc)."""
    return stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_floor_server(port_file: Path, seq: int, aio: bool = False,
                       event_loop: str = "auto") -> tuple[subprocess.Popen, str]:
    """`python -m bench.floor` as a subprocess on 127.0.0.1 (aio: on an `event_loop` loop, as
    rnnserve-server's --event-loop); -> (process, address)."""
    # The grpc.aio floor runs with the gRPC core settings rnnserve-server sets for itself.
    env = {**os.environ, EXPERIMENTS_ENV: server_experiments(os.environ)} if aio else None
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor", "--port-file", str(port_file),
                             "--seq", str(seq), *(["--aio", "--event-loop", event_loop] if aio else [])],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True, env=env)
    if not proc.stdout.readline().startswith("listening"):
        proc.kill()
        raise RuntimeError("the canned-response server did not start")
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--port-file", required=True, help="write the bound port here")
    parser.add_argument("--seq", type=int, default=64, help="seq_len of the canned logits")
    parser.add_argument("--workers", type=int, default=32, help="gRPC handler threads")
    parser.add_argument("--aio", action="store_true", help="a grpc.aio server (one event loop) instead")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                        help="the --aio server's loop, as rnnserve-server's --event-loop")
    args = parser.parse_args(argv)
    if args.aio:
        # on the loop rnnserve-server runs on with the same --event-loop (serve/eventloop.py)
        with asyncio.Runner(loop_factory=lambda: new_event_loop(args.event_loop)) as runner:
            runner.run(_serve_aio(args))
        return 0
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(CannedInference(args.seq), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(args.port_file).write_text(str(port))
    print("listening", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(0)
    return 0


async def _serve_aio(args) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(CannedInferenceAio(args.seq), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(args.port_file).write_text(str(port))
    print("listening", flush=True)
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    await server.stop(0)


if __name__ == "__main__":
    sys.exit(main())
