"""Idle streams against `rnnserve-server` (default flags): does the server still answer?

    python -m bench.bench_idle_streams [--streams 10000] [--channels 20] [--probes 500]

The server is a subprocess on 127.0.0.1 serving the 2-layer LSTM char model of
bench.bench_server. One client process (grpc.aio) opens --streams streams of mixed kinds
over --channels connections and leaves them idle:
  45%  ModelStreamInfer that sent nothing;
  45%  TextService.Stream that sent nothing;
  10%  ModelStreamInfer that started a sequence (one step, answered) and then went quiet,
       so the server also holds that many live sequences;
  plus --generates Generate calls whose answers the client never reads.
With all of them open it times --probes ServerLive calls one after another (p50/p99) and
sends ModelInfer requests whose logits must equal onnxruntime in this process (max |diff|).
The same probes run before the streams open, for comparison. The server's RSS (VmRSS) is
read before and after: RSS per idle stream = the growth / streams.
Goals (issue 12): ServerLive p99 < 50 ms with 10,000 idle streams; ModelInfer exact (<= 1e-5).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.bench_server import MODEL, SEQ, VOCAB, build_repository, start_server
from rnnserve.serve.engine.runtime import CPU, create_session
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def probe(address: str, n: int, tokens: np.ndarray, expected: np.ndarray) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        live = []
        for _ in range(n):
            t0 = time.perf_counter()
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
            live.append(time.perf_counter() - t0)
        diff, infer = 0.0, []
        for _ in range(20):
            t0 = time.perf_counter()
            answer = await stub.ModelInfer(convert.infer_request_to_proto(MODEL, {"tokens": tokens}), timeout=30)
            infer.append(time.perf_counter() - t0)
            diff = max(diff, float(np.abs(convert.infer_outputs_from_proto(answer)["logits"] - expected).max()))
    ms = np.array(live) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "infer_p50": float(np.median(infer) * 1e3), "diff": diff}


async def open_idle(address: str, streams: int, channels: int, generates: int) -> tuple[list, list]:
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    calls = []
    step = convert.infer_request_to_proto(MODEL, {"tokens": np.array([[1]], np.int64)})
    started = []
    for i in range(streams):
        ch = chans[i % channels]
        kind = i % 20
        if kind < 9:
            calls.append(pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer())
        elif kind < 18:
            calls.append(tpb_grpc.TextServiceStub(ch).Stream())
        else:
            call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
            request = pb.ModelInferRequest()
            request.CopyFrom(step)
            request.parameters["sequence_id"].int64_param = 1 + i
            request.parameters["sequence_start"].bool_param = True
            started.append((call, request))
            calls.append(call)
    for i in range(generates):
        calls.append(tpb_grpc.TextServiceStub(chans[i % channels]).Generate(
            tpb.GenerateRequest(model=MODEL, prompt="A", max_tokens=4096, seed=i)))
    for k in range(0, len(calls), 500):   # every call reaches the server
        await asyncio.gather(*(c.wait_for_connection() for c in calls[k:k + 500]))
    for k in range(0, len(started), 200):
        batch = started[k:k + 200]
        await asyncio.gather(*(call.write(request) for call, request in batch))
        answers = await asyncio.gather(*(call.read() for call, _ in batch))
        bad = [a.error_message for a in answers if a.error_message]
        assert not bad, bad[0]
    return chans, calls


async def scenario(args, address: str, pid: int, tokens: np.ndarray, expected: np.ndarray) -> dict:
    before = await probe(address, args.probes, tokens, expected)
    rss0 = rss_mib(pid)
    t0 = time.perf_counter()
    chans, calls = await open_idle(address, args.streams, args.channels, args.generates)
    open_s = time.perf_counter() - t0
    await asyncio.sleep(2.0)   # let the unread Generates fill their windows
    rss1 = rss_mib(pid)
    during = await probe(address, args.probes, tokens, expected)
    for call in calls:
        call.cancel()
    for ch in chans:
        await ch.close()
    return {"before": before, "during": during, "rss0": rss0, "rss1": rss1, "open_s": open_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--generates", type=int, default=20)
    parser.add_argument("--probes", type=int, default=500)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), size=(1, SEQ), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        session = create_session(os.path.join(repo, MODEL, "1", "model.onnx"), [CPU], "cpu", intra_op_threads=1)
        feeds = {i.name: tokens if i.name == "tokens" else np.zeros((i.shape[0], 1, i.shape[2]), np.float32)
                 for i in session.get_inputs()}
        expected = session.run(["logits"], feeds)[0]
        proc, address = start_server(repo, 0, Path(tmp) / "port")
        try:
            r = asyncio.run(scenario(args, address, proc.pid, tokens, expected))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    total = args.streams + args.generates
    per_stream_kib = (r["rss1"] - r["rss0"]) * 1024 / total
    print(f"\nrnnserve-server default flags; {total} idle streams ({args.streams} mixed + {args.generates} unread "
          f"Generate) over {args.channels} connections, opened in {r['open_s']:.1f} s; {os.cpu_count()} CPUs, "
          f"shared; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"| {'when':<22} | {'ServerLive p50 ms':>17} | {'p99 ms':>7} | {'ModelInfer p50 ms':>17} "
          f"| {'max |dlogit|':>12} | {'server RSS MiB':>14} |")
    print(f"|{'-' * 24}|{'-' * 19}|{'-' * 9}|{'-' * 19}|{'-' * 14}|{'-' * 16}|")
    for label, p, rss in (("no streams open", r["before"], r["rss0"]),
                          (f"{total} idle streams", r["during"], r["rss1"])):
        print(f"| {label:<22} | {p['p50']:>17.3f} | {p['p99']:>7.3f} | {p['infer_p50']:>17.3f} "
              f"| {p['diff']:>12.1e} | {rss:>14.1f} |")
    d = r["during"]
    print(f"RSS per idle stream: {per_stream_kib:.1f} KiB")
    print(f"goal: ServerLive p99 {d['p99']:.2f} ms < 50 ms with {total} idle streams: "
          f"{'met' if d['p99'] < 50 else 'MISSED'}")
    print(f"goal: ModelInfer exact (max |dlogit| {d['diff']:.1e} <= 1e-5): {'met' if d['diff'] <= 1e-5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
