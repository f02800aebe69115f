"""The asyncio front end under idle streams: a thousand open streams that send nothing
(ModelStreamInfer, TextService.Stream) plus Generate calls whose answers nobody reads hold
no thread, so ServerLive and an exact ModelInfer still answer; past --max-streams a new
stream gets RESOURCE_EXHAUSTED at once, and a freed slot serves again."""
from __future__ import annotations

import asyncio
import os
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.serve.errors import ResourceExhausted
from rnnserve.serve.frontend.limits import CallLimits
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.fixtures import serving

IDLE_STREAMS = 1000
UNREAD_GENERATES = 4


async def _open_idle(address: str, infer_streams: int, text_streams: int, generates: int):
    """Open the streams on one aio channel; -> (channel, calls). Nothing is sent on them."""
    channel = grpc.aio.insecure_channel(address)
    infer = pb_grpc.GRPCInferenceServiceStub(channel)
    text = tpb_grpc.TextServiceStub(channel)
    calls = [infer.ModelStreamInfer() for _ in range(infer_streams)]
    calls += [text.Stream() for _ in range(text_streams)]
    calls += [text.Generate(tpb.GenerateRequest(model="emb-lstm", prompt="h", max_tokens=4000, seed=i))
              for i in range(generates)]
    for call in calls:   # every call reaches the server (no message needed for that)
        await call.wait_for_connection()
    return channel, calls


async def _wait_for(predicate, timeout: float = 60.0) -> None:
    until = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < until, "timed out"
        await asyncio.sleep(0.05)


def _reference(repo: str, model: str, tokens: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(os.path.join(repo, model, "1", "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    feeds = {"tokens": tokens}
    for inp in session.get_inputs()[1:]:
        layers, _, hidden = inp.shape
        feeds[inp.name] = np.zeros((layers, tokens.shape[0], hidden), np.float32)
    return session.run(["logits"], feeds)[0]


def test_a_thousand_idle_streams_leave_the_server_answering(hello_repo):
    tokens = np.array([[0, 1, 2, 2, 3]], dtype=np.int64)   # "hello"
    expected = _reference(hello_repo, "emb-lstm", tokens)

    async def scenario(server, address):
        channel, calls = await _open_idle(address, IDLE_STREAMS // 2, IDLE_STREAMS // 2, UNREAD_GENERATES)
        try:
            await _wait_for(lambda: server.open_streams >= IDLE_STREAMS + UNREAD_GENERATES)
            async with grpc.aio.insecure_channel(address) as probe:
                stub = pb_grpc.GRPCInferenceServiceStub(probe)
                t0 = time.monotonic()
                assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=3)).live
                live_s = time.monotonic() - t0
                answer = await stub.ModelInfer(convert.infer_request_to_proto("emb-lstm", {"tokens": tokens}),
                                               timeout=10)
            logits = convert.infer_outputs_from_proto(answer)["logits"]
            np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
            assert live_s < 3
        finally:
            for call in calls:
                call.cancel()
            await channel.close()
        await _wait_for(lambda: server.open_streams == 0)

    with serving(hello_repo, max_generate_tokens=4000) as (server, address):
        asyncio.run(scenario(server, address))


def test_streams_past_the_bound_are_refused_not_hung(hello_repo):
    async def scenario(server, address):
        channel, calls = await _open_idle(address, 2, 1, 0)
        try:
            await _wait_for(lambda: server.open_streams == 3)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            refused = stub.ModelStreamInfer()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(refused.read(), 10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-streams" in info.value.details()
            assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=3)).live   # unary calls go on
            calls[0].cancel()
            await _wait_for(lambda: server.open_streams == 2)
            again = stub.ModelStreamInfer()   # a freed slot serves again
            await again.write(convert.infer_request_to_proto("emb-gru", {"tokens": np.array([[1, 2]])}))
            assert (await asyncio.wait_for(again.read(), 10)).infer_response.model_name == "emb-gru"
            again.cancel()
        finally:
            for call in calls:
                call.cancel()
            await channel.close()

    with serving(hello_repo, max_streams=3) as (server, address):
        asyncio.run(scenario(server, address))


def test_call_limits_count_and_refuse():
    limits = CallLimits(max_streams=1, max_calls=2)
    limits.enter(False)
    limits.enter(False)
    assert limits.calls == 2
    with pytest.raises(ResourceExhausted, match="--max-concurrent-calls"):
        limits.enter(False)
    limits.enter(True)
    assert limits.streams == 1
    with pytest.raises(ResourceExhausted, match="--max-streams"):
        limits.enter(True)
    limits.leave(True)
    limits.leave(False)
    limits.leave(False)
    assert (limits.calls, limits.streams) == (0, 0)
