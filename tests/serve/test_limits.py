"""Every limit over the wire, with its status: the receive limit (plain and a real gzip request
that inflates past it), the per-request batch, bounded names, ids, stop strings and text;
client strings cut short in messages; bodies that do not decode and tensors that do not add
up get INVALID_ARGUMENT, never INTERNAL."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.serve.client import RnnClient
from rnnserve.serve.dataplane.validation import MAX_SEQUENCE_ID_CHARS, MAX_STOP_CHARS, MAX_STOP_STRINGS
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.fixtures import MAX_SEQ_LEN, serving

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LIMIT = 1 << 20
MAX_BATCH = 8
GARBAGE = (b"\x0a\xff", b"\x0a\x02\xff\xfe", b"\xff" * 7, b"\x08")   # truncated, bad UTF-8, bad tags


@pytest.fixture(scope="module")
def server(hello_repo):
    with serving(hello_repo, max_message_bytes=LIMIT, max_batch_size=MAX_BATCH, warmup=False) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server[1], options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


def _status(call, request, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        result = call(request, timeout=30, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def _infer(model: str, tokens, **params) -> pb.ModelInferRequest:
    return convert.infer_request_to_proto(model, {"tokens": np.asarray(tokens, np.int64)}, parameters=params)


def test_receive_limit_plain_and_gzip(server, channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    big = _infer("emb-lstm", np.zeros((70_000, 2)))                   # 1.1 MB plain
    assert big.ByteSize() > LIMIT
    assert _status(stub.ModelInfer, big)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, message = _status(stub.ModelInfer, big, compression=grpc.Compression.Gzip)   # a few KB on the wire
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Decompressed" in message
    small = _infer("emb-lstm", [[0, 1, 2, 2]])
    plain = stub.ModelInfer(small, timeout=30)
    assert stub.ModelInfer(small, timeout=30, compression=grpc.Compression.Gzip) == plain


def test_batch_over_max_batch_size_names_both_numbers(channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    code, message = _status(stub.ModelInfer, _infer("emb-lstm", np.zeros((MAX_BATCH + 1, 2))))
    assert code == INVALID and f"batch {MAX_BATCH + 1}" in message and f"maximum of {MAX_BATCH}" in message
    assert _status(stub.ModelInfer, _infer("emb-lstm", np.zeros((MAX_BATCH, 2))))[0] == grpc.StatusCode.OK


def test_bounded_lengths_and_short_messages(channel):
    stub, text = pb_grpc.GRPCInferenceServiceStub(channel), tpb_grpc.TextServiceStub(channel)
    huge = "m" * 500_000
    cases = [
        (stub.ModelInfer, _infer(huge, [[1]])),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name=huge)),
        (text.Predict, tpb.PredictRequest(model=huge, text="hello")),
        (text.Generate, tpb.GenerateRequest(model="emb-lstm", prompt="h", max_tokens=2,
                                            stop=["x"] * (MAX_STOP_STRINGS + 1))),
        (text.Generate, tpb.GenerateRequest(model="emb-lstm", prompt="h", max_tokens=2,
                                            stop=["y" * (MAX_STOP_CHARS // 2 + 1)] * 2)),
        (text.Generate, tpb.GenerateRequest(model="emb-lstm", prompt="h", max_tokens=2, stop=[huge])),
        (text.Predict, tpb.PredictRequest(model="emb-lstm", text="h" * (MAX_SEQ_LEN + 1))),
        (text.Score, tpb.ScoreRequest(model="emb-lstm", text="h" * (MAX_SEQ_LEN + 1))),
        (text.Predict, tpb.PredictRequest(model="emb-lstm", text="\u00e9" * 60)),
        (stub.ModelInfer, _infer("emb-lstm", [[1]], sequence_id="s" * (MAX_SEQUENCE_ID_CHARS + 1),
                                 sequence_start=True)),
    ]
    named = pb.ModelInferRequest(model_name="emb-lstm")
    named.inputs.add(name=huge, datatype="INT64", shape=[1, 1]).contents.int64_contents.append(1)
    cases.append((stub.ModelInfer, named))
    odd_type = pb.ModelInferRequest(model_name="emb-lstm")
    odd_type.inputs.add(name="tokens", datatype=huge, shape=[1, 1])
    odd_type.raw_input_contents.append(b"\0" * 8)
    cases.append((stub.ModelInfer, odd_type))
    for call, request in cases:
        code, message = _status(call, request)
        assert code == INVALID, (code, message[:200])
        assert len(message) < 600, message[:200]
    code, message = _status(stub.ModelMetadata, pb.ModelMetadataRequest(name="emb-lstm", version=huge))
    assert code == grpc.StatusCode.NOT_FOUND and len(message) < 600


def test_a_4mb_model_name_gets_a_short_answer(hello_server):
    """With the default limits: the status message stays far below the client's header limit."""
    with RnnClient(hello_server[1], timeout=30) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.predict("n" * 4_000_000, "hello")
    assert info.value.code() == INVALID and len(info.value.details()) < 600


def _raw(channel, method: str, streaming_response: bool = False, streaming_request: bool = False):
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    return kind[(streaming_request, streaming_response)](method)   # bytes in, bytes out


@pytest.mark.parametrize("body", GARBAGE)
def test_undecodable_bodies_are_invalid_argument(channel, body):
    for method, response_stream in (("/inference.GRPCInferenceService/ModelInfer", False),
                                    ("/inference.GRPCInferenceService/RepositoryIndex", False),
                                    ("/rnnserve.v1.TextService/Predict", False),
                                    ("/rnnserve.v1.TextService/Generate", True),
                                    ("/grpc.health.v1.Health/Check", False)):
        code, message = _status(_raw(channel, method, response_stream), body)
        assert code == INVALID and "not a valid" in message, (method, code, message)
    stream = _raw(channel, "/rnnserve.v1.TextService/Stream", True, True)
    assert _status(stream, iter([body]))[0] == INVALID
    # ModelStreamInfer answers in-stream, and the stream goes on.
    infer_stream = _raw(channel, "/inference.GRPCInferenceService/ModelStreamInfer", True, True)
    good = _infer("emb-lstm", [[0, 1, 2, 2]]).SerializeToString()
    answers = [pb.ModelStreamInferResponse.FromString(a) for a in infer_stream(iter([body, good]), timeout=30)]
    assert "not a valid" in answers[0].error_message and not answers[1].error_message
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING


def test_shapes_that_do_not_add_up_are_invalid_argument(channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    cases = []
    for shape, blob in (([0, 2**62], b""), ([1] * 65, b"\0" * 8), ([2**62, 2**62, 0], b""), ([1] * 17, b"\0" * 8)):
        msg = pb.ModelInferRequest(model_name="emb-lstm")
        msg.inputs.add(name="tokens", datatype="INT64", shape=shape)
        msg.raw_input_contents.append(blob)
        cases.append(msg)
        typed = pb.ModelInferRequest(model_name="emb-lstm")
        typed.inputs.add(name="tokens", datatype="INT64", shape=shape)
        cases.append(typed)
    for msg in cases:
        code, message = _status(stub.ModelInfer, msg)
        assert code == INVALID, (list(msg.inputs[0].shape)[:3], code, message)
    with pytest.raises(Exception) as info:   # the same check on the client's side of convert
        convert.tensor_from_raw("tokens", "INT64", [0, 2**62], b"")
    assert info.type.__name__ == "InvalidArgument"
