"""The gRPC server over the wire, with our own generated stubs: health, reflection,
every validation rule with its status code, NOT_FOUND, the in-stream errors of
ModelStreamInfer, the text API, and the error map. A real server on 127.0.0.1:0
serves the real exported models of the session's hello_repo / charlm_repo."""
from __future__ import annotations

import gc
import logging
import math
import time

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rnnserve.serve import errors
from rnnserve.serve.frontend.grpc_errors import status_for
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.fixtures import HELLO_MODELS, MAX_SEQ_LEN, serving

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def channel(hello_server):
    with grpc.insecure_channel(hello_server[1]) as ch:
        yield ch


@pytest.fixture(scope="module")
def infer_stub(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def text_stub(channel):
    return tpb_grpc.TextServiceStub(channel)


def _code(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30)
    return info.value.code(), info.value.details()


def _raw_request(model: str, *tensors, outputs=(), version="", params=None):
    """tensors: (name, datatype, shape, bytes) -> ModelInferRequest with raw contents."""
    msg = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape, blob in tensors:
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
        msg.raw_input_contents.append(blob)
    for name in outputs:
        msg.outputs.add(name=name)
    for key, value in (params or {}).items():
        setattr(msg.parameters[key], value[0], value[1])
    return msg


def _tokens(ids, dtype="INT64") -> tuple:
    array = np.asarray(ids, dtype=convert.NUMPY_DTYPES[dtype])
    return ("tokens", dtype, array.shape, array.tobytes())


def _state(name, array) -> tuple:
    array = np.asarray(array, dtype=np.float32)
    return (name, "FP32", array.shape, array.tobytes())


# ---- health, reflection, metadata ---------------------------------------------------------

def test_health_follows_readiness(hello_server, channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
        health_pb2.HealthCheckResponse.SERVING
    for model in HELLO_MODELS:
        assert health.Check(health_pb2.HealthCheckRequest(service=model)).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert _code(health.Check, health_pb2.HealthCheckRequest(service="nope"))[0] == NOT_FOUND


def test_health_after_unload_and_load(charlm_repo):
    with serving(charlm_repo, model_control_mode="explicit") as (_, address), grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        def check():
            return health.Check(health_pb2.HealthCheckRequest(service="chargru")).status
        assert check() == health_pb2.HealthCheckResponse.SERVING
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="chargru"))
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stub.ModelReady(pb.ModelReadyRequest(name="chargru")).ready
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert {(m.name, m.state) for m in index.models} >= {("chargru", "UNLOADED"),
                                                             ("charlm", "READY")}
        code, message = _code(stub.ModelInfer, _raw_request("chargru", _tokens([[1, 2]])))
        assert code == grpc.StatusCode.UNAVAILABLE and "chargru" in message
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="chargru"))
        assert check() == health_pb2.HealthCheckResponse.SERVING
        assert _code(stub.RepositoryModelLoad,
                     pb.RepositoryModelLoadRequest(model_name="nope"))[0] == NOT_FOUND


def test_reflection_lists_every_service(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert services >= {"inference.GRPCInferenceService", "rnnserve.v1.TextService",
                        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    pool = descriptor_pool.DescriptorPool(database)
    infer = pool.FindServiceByName("inference.GRPCInferenceService")
    assert "ModelStreamInfer" in infer.methods_by_name
    generate = pool.FindServiceByName("rnnserve.v1.TextService").methods_by_name["Generate"]
    assert generate.server_streaming
    assert pool.FindMessageTypeByName("inference.ModelConfig").fields_by_name["input"].number == 5
    assert pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")


def test_live_ready_metadata(infer_stub):
    assert infer_stub.ServerLive(pb.ServerLiveRequest()).live
    assert infer_stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = infer_stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "rnnserve" and any("CPUExecutionProvider" in e for e in meta.extensions)
    for model in HELLO_MODELS:
        assert infer_stub.ModelReady(pb.ModelReadyRequest(name=model)).ready
        m = infer_stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
        assert m.name == model and list(m.versions) == ["1"]
        assert m.inputs[0].name == "tokens" and m.inputs[0].datatype == "INT64"
        assert [o.name for o in m.outputs][:1] == ["logits"]
        config = infer_stub.ModelConfig(pb.ModelConfigRequest(name=model)).config
        assert config.platform == "onnxruntime_onnx" and config.input[0].name == "tokens"


def test_statistics_count_requests(infer_stub):
    before = infer_stub.ModelStatistics(pb.ModelStatisticsRequest(name="rnn")).model_stats[0]
    infer_stub.ModelInfer(_raw_request("rnn", _tokens([[0, 1, 2]])))
    after = infer_stub.ModelStatistics(pb.ModelStatisticsRequest(name="rnn")).model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.execution_count >= before.execution_count + 1
    everything = infer_stub.ModelStatistics(pb.ModelStatisticsRequest())
    assert {s.name for s in everything.model_stats} == set(HELLO_MODELS)


# ---- inference: typed contents, requested outputs, stream ---------------------------------

def test_typed_contents_equal_raw(infer_stub):
    ids = [[0, 1, 2, 2, 3]]
    raw = convert.infer_outputs_from_proto(infer_stub.ModelInfer(_raw_request("emb-gru", _tokens(ids))))
    typed = pb.ModelInferRequest(model_name="emb-gru")
    tensor = typed.inputs.add(name="tokens", datatype="INT64", shape=[1, 5])
    tensor.contents.int64_contents.extend(ids[0])
    typed.outputs.add(name="logits")
    reply = infer_stub.ModelInfer(typed)
    assert [o.name for o in reply.outputs] == ["logits"] and len(reply.raw_output_contents) == 1
    out = convert.infer_outputs_from_proto(reply)
    assert np.array_equal(out["logits"], raw["logits"])
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (1, 5, 4)


def test_stream_infer_answers_errors_in_stream(infer_stub):
    good = _raw_request("rnn", _tokens([[0, 1, 2]]))
    bad = _raw_request("rnn", _tokens([[0, 9, 2]]))
    unknown = _raw_request("nope", _tokens([[0]]))
    replies = list(infer_stub.ModelStreamInfer(iter([good, bad, unknown, good]), timeout=30))
    assert len(replies) == 4
    assert replies[0].error_message == "" and replies[0].infer_response.model_name == "rnn"
    assert "out of range" in replies[1].error_message
    assert "unknown model 'nope'" in replies[2].error_message
    assert replies[3].infer_response.raw_output_contents == replies[0].infer_response.raw_output_contents


def test_stream_cancelled_with_answers_pending_leaves_the_server_answering(infer_stub):
    """A client that goes away while its answers are still queued or running: the stream's
    answer loop and reader end, the runs finish unread, and the next streams are answered."""
    request = _raw_request("emb-lstm", _tokens([[1, 2, 3] * 21]), outputs=["logits"])
    expected = list(infer_stub.ModelStreamInfer(iter([request]), timeout=30))[0]
    for _ in range(10):
        call = infer_stub.ModelStreamInfer(iter([request] * 200), timeout=30)
        assert next(call).infer_response.raw_output_contents == expected.infer_response.raw_output_contents
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    replies = list(infer_stub.ModelStreamInfer(iter([request] * 4), timeout=30))
    assert [r.error_message for r in replies] == [""] * 4
    assert all(r.infer_response.raw_output_contents == expected.infer_response.raw_output_contents for r in replies)
    assert infer_stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


# ---- validation over the wire --------------------------------------------------------------

LSTM_STATE = (2, 1, 8)   # emb-lstm: 2 layers, hidden 8
nan_state = np.zeros(LSTM_STATE, np.float32)
nan_state[1, 0, 3] = np.nan
inf_state = np.zeros(LSTM_STATE, np.float32)
inf_state[0, 0, 0] = np.inf

INVALID_CASES = {
    "raw bytes too short": (_raw_request("emb-lstm", ("tokens", "INT64", [1, 5], b"\0" * 32)),
                            ["40", "32"]),
    "raw count mismatch": (pb.ModelInferRequest(model_name="emb-lstm", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="tokens", datatype="INT64", shape=[1, 1]),
        pb.ModelInferRequest.InferInputTensor(name="h0", datatype="FP32", shape=[2, 1, 8])],
        raw_input_contents=[b"\0" * 8]), ["2 inputs"]),
    "typed count mismatch": (pb.ModelInferRequest(model_name="emb-lstm", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="tokens", datatype="INT64", shape=[1, 3],
                                              contents=pb.InferTensorContents(
                                                  int64_contents=[1, 2]))]), ["3 elements"]),
    "wrong datatype": (_raw_request("emb-lstm", _tokens([[0, 1]], "INT32")), ["INT64", "INT32"]),
    "unknown datatype": (_raw_request("emb-lstm", ("tokens", "INT65", [1, 1], b"\0" * 8)),
                         ["unknown datatype 'INT65'"]),
    "BYTES datatype": (_raw_request("emb-lstm", ("tokens", "BYTES", [1, 1], b"\1\0\0\0a")),
                       ["INT64", "BYTES"]),
    "negative dim": (_raw_request("emb-lstm", ("tokens", "INT64", [1, -2], b"")), ["negative"]),
    "negative id": (_raw_request("emb-lstm", _tokens([[0, -1, 2]])), ["-1", "out of range"]),
    "id >= vocab": (_raw_request("emb-lstm", _tokens([[0, 4]])), ["4", "out of range"]),
    "batch 0": (_raw_request("emb-lstm", ("tokens", "INT64", [0, 5], b"")), ["batch"]),
    "seq 0": (_raw_request("emb-lstm", ("tokens", "INT64", [1, 0], b"")), ["seq"]),
    "seq too long": (_raw_request("emb-lstm", _tokens([[0] * (MAX_SEQ_LEN + 1)])),
                     [str(MAX_SEQ_LEN + 1), str(MAX_SEQ_LEN)]),
    "wrong rank": (_raw_request("emb-lstm", _tokens([0, 1, 2])), ["rank"]),
    "missing tokens": (_raw_request("emb-lstm", _state("h0", np.zeros(LSTM_STATE))), ["tokens"]),
    "unknown input": (_raw_request("emb-lstm", _tokens([[0]]), _state("foo", [1.0])), ["'foo'"]),
    "unknown output": (_raw_request("emb-lstm", _tokens([[0]]), outputs=["bar"]), ["'bar'"]),
    "bad state shape": (_raw_request("emb-lstm", _tokens([[0]]), _state("h0", np.zeros((1, 1, 8)))),
                        ["h0", "[1, 1, 8]", "[2, 1, 8]"]),
    "NaN state": (_raw_request("emb-lstm", _tokens([[0]]), _state("c0", nan_state)), ["NaN"]),
    "Inf state": (_raw_request("emb-lstm", _tokens([[0]]), _state("h0", inf_state)), ["Inf"]),
    "bad parameter": (_raw_request("emb-lstm", _tokens([[0]]),
                                   params={"sequence_start": ("int64_param", 1)}),
                      ["sequence_start"]),
}


@pytest.mark.parametrize("case", list(INVALID_CASES))
def test_invalid_infer_is_invalid_argument(infer_stub, case):
    request, fragments = INVALID_CASES[case]
    code, message = _code(infer_stub.ModelInfer, request)
    assert code == INVALID, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_refused_request_is_let_go(infer_stub):
    """A refused request's memory goes back right after the refusal: grpc.aio keeps the last
    call's error until the next call, and that error must not hold the request. With the
    garbage collector off, only references matter."""
    request = _raw_request("emb-lstm", _tokens([[0, 4]]))   # id 4 >= vocab 4
    request.id = "let-go"

    def kept() -> int:
        return sum(1 for o in gc.get_objects()
                   if type(o).__name__ == "ModelInferRequest" and o is not request and o.id == "let-go")

    gc.disable()
    try:
        assert _code(infer_stub.ModelInfer, request)[0] == INVALID
        until = time.monotonic() + 5
        while kept() and time.monotonic() < until:   # the server's thread may still be finishing the call
            time.sleep(0.02)
        assert kept() == 0
    finally:
        gc.enable()


def test_timeout_parameter_is_deadline_exceeded(infer_stub):
    """Triton's `timeout` parameter (µs): 1 µs has passed by the time the request could run."""
    request = _raw_request("emb-lstm", _tokens([[0, 1]]), params={"timeout": ("int64_param", 1)})
    code, message = _code(infer_stub.ModelInfer, request)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in message


def test_invalid_text_requests(text_stub):
    code, message = _code(text_stub.Predict, tpb.PredictRequest(model="rnn", text="hexlo!"))
    assert code == INVALID and "'x'" in message and "'!'" in message
    assert _code(text_stub.Predict, tpb.PredictRequest(model="rnn", text=""))[0] == INVALID
    assert _code(text_stub.Predict, tpb.PredictRequest(model="rnn", text="hello",
                                                       top_k=10_000))[0] == INVALID
    assert _code(text_stub.Score, tpb.ScoreRequest(model="rnn", text="h"))[0] == INVALID
    bad_generate = [dict(max_tokens=0), dict(max_tokens=5, temperature=-1.0),
                    dict(max_tokens=5, top_p=1.5), dict(max_tokens=5, prompt="x")]
    for extra in bad_generate:
        request = tpb.GenerateRequest(model="rnn", **{"prompt": "h", **extra})
        code, message = _code(lambda r, timeout: list(text_stub.Generate(r, timeout=timeout)),
                              request)
        assert code == INVALID, (extra, message)


def test_not_found(infer_stub, text_stub):
    calls = [
        (infer_stub.ModelInfer, _raw_request("nope", _tokens([[0]]))),
        (infer_stub.ModelInfer, _raw_request("rnn", _tokens([[0]]), version="7")),
        (infer_stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
        (infer_stub.ModelMetadata, pb.ModelMetadataRequest(name="rnn", version="7")),
        (infer_stub.ModelConfig, pb.ModelConfigRequest(name="nope")),
        (infer_stub.ModelReady, pb.ModelReadyRequest(name="nope")),
        (infer_stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope")),
        (text_stub.Predict, tpb.PredictRequest(model="nope", text="hello")),
        (text_stub.Score, tpb.ScoreRequest(model="nope", text="hello")),
        (lambda r, timeout: list(text_stub.Generate(r, timeout=timeout)),
         tpb.GenerateRequest(model="nope", prompt="h", max_tokens=3)),
    ]
    for call, request in calls:
        code, message = _code(call, request)
        assert code == NOT_FOUND, message
        assert "nope" in message or "'7'" in message


def test_server_survives_bad_input(infer_stub):
    """After every bad request above (module order), the server still answers correctly."""
    assert infer_stub.ServerLive(pb.ServerLiveRequest()).live
    reply = infer_stub.ModelInfer(_raw_request("emb-lstm", _tokens([[0, 1, 2, 2, 3]])))
    assert reply.model_name == "emb-lstm" and reply.model_version == "1"
    assert [o.name for o in reply.outputs] == ["logits", "hn", "cn"]


# ---- text API ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", HELLO_MODELS)
def test_predict_hello(text_stub, model):
    reply = text_stub.Predict(tpb.PredictRequest(model=model, text="hello", top_k=2))
    assert reply.decoded == "ohlol" and reply.model == model and reply.version == "1"
    assert [p.input_char for p in reply.positions] == list("hello")
    for p in reply.positions:
        assert len(p.top) == 2 and p.top[0].char == p.char and p.top[0].prob >= p.top[1].prob
        assert 0.0 < p.prob <= 1.0


def test_generate_streams_and_is_seeded(text_stub):
    request = tpb.GenerateRequest(model="emb-lstm", prompt="he", max_tokens=12, seed=7)
    first = list(text_stub.Generate(request, timeout=30))
    again = list(text_stub.Generate(request, timeout=30))
    assert [e.index for e in first] == list(range(12))
    assert [e.text for e in first] == [e.text for e in again]
    assert first[-1].finish_reason == "length" and all(e.finish_reason == "" for e in first[:-1])
    greedy = tpb.GenerateRequest(model="emb-lstm", prompt="hell", max_tokens=4, temperature=0.0)
    assert "".join(e.text for e in text_stub.Generate(greedy, timeout=30))[:1] == "o"
    stop = tpb.GenerateRequest(model="emb-lstm", prompt="h", max_tokens=50, temperature=0.0,
                               stop=["l"])
    events = list(text_stub.Generate(stop, timeout=30))
    assert events[-1].finish_reason == "stop" and len(events) < 50


def test_score(text_stub):
    reply = text_stub.Score(tpb.ScoreRequest(model="emb-gru", text="hello"))
    assert reply.num_predicted == 4 and reply.log_likelihood < 0
    assert math.isclose(reply.nats_per_char, -reply.log_likelihood / 4, rel_tol=1e-6)
    assert math.isclose(reply.bits_per_char, reply.nats_per_char / math.log(2), rel_tol=1e-6)


# ---- the error map ----------------------------------------------------------------------------

def test_error_map(caplog):
    for exc, code in [(errors.InvalidArgument("x"), INVALID), (errors.NotFound("x"), NOT_FOUND),
                      (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
                      (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
                      (errors.Cancelled("x"), grpc.StatusCode.CANCELLED)]:
        assert status_for(exc, "test") == (code, "x")
    with caplog.at_level(logging.ERROR, logger="rnnserve.serve.frontend.grpc_errors"):
        try:
            raise KeyError("secret detail")
        except KeyError as exc:
            code, message = status_for(exc, "test")
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message
    request_id = message.rsplit(" ", 1)[-1].rstrip(")")
    assert len(request_id) == 12
    assert request_id in caplog.text and "secret detail" in caplog.text
