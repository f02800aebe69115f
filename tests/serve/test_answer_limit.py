"""--max-response-bytes over a real server: a request whose answer would be larger gets
INVALID_ARGUMENT naming both numbers before anything runs (the model's execution count
stays), one just under the limit is answered (and fits it), and the text API's answers
(Predict, Stream chunks) are bounded by the same limit. gRPC's send limit is the same number."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from rnnserve.serve.dataplane import answers
from rnnserve.serve.errors import InvalidArgument
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from rnnserve.serve.wire.types import InferResponse
from tests.fixtures import serving

LIMIT = 4096
MODEL, STEPS = "emb-lstm", 8
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(hello_repo):
    with serving(hello_repo, max_response_bytes=LIMIT, warmup=False) as running:
        yield running


@pytest.fixture(scope="module")
def stubs(server):
    with grpc.insecure_channel(server[1]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), tpb_grpc.TextServiceStub(channel)


def _request(rows: int) -> pb.ModelInferRequest:
    tokens = np.zeros((rows, STEPS), np.int64)
    return convert.infer_request_to_proto(MODEL, {"tokens": tokens}, outputs=["logits"], request_id="r1")


def _runs(stub) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=30)
    return sum(s.execution_count for s in stats.model_stats)


def test_largest_answer_under_the_limit_passes_one_row_more_is_refused(server, stubs):
    stub, _ = stubs
    io = server[0].dataplane.engine(MODEL).io

    def bound(rows: int) -> int:
        return answers.tensor_answer_bytes(io, ["logits"], {"tokens": np.zeros((rows, STEPS), np.int64)},
                                           MODEL, "1", "r1")
    rows = max(r for r in range(1, 33) if bound(r) <= LIMIT)
    assert rows < 32 and bound(rows + 1) > LIMIT
    answer = stub.ModelInfer(_request(rows), timeout=30)
    assert answer.ByteSize() <= LIMIT
    assert convert.infer_outputs_from_proto(answer)["logits"].shape[0] == rows
    before = _runs(stub)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_request(rows + 1), timeout=30)
    assert err.value.code() == INVALID
    assert str(bound(rows + 1)) in err.value.details() and f"maximum of {LIMIT}" in err.value.details()
    assert _runs(stub) == before            # refused before onnxruntime ran
    # the state alone is small: the same rows are answered
    state_only = convert.infer_request_to_proto(MODEL, {"tokens": np.zeros((rows + 1, STEPS), np.int64)},
                                                outputs=["hn"])
    assert stub.ModelInfer(state_only, timeout=30).ByteSize() <= LIMIT


def test_text_answers_are_bounded_too(stubs):
    _, text = stubs
    answer = text.Predict(tpb.PredictRequest(model=MODEL, text="hello", top_k=4), timeout=30)
    assert answer.decoded == "ohlol" and answer.ByteSize() <= answers.text_answer_bytes(MODEL, "1", 5, 4)
    with pytest.raises(grpc.RpcError) as err:
        text.Predict(tpb.PredictRequest(model=MODEL, text="hello" * 12, top_k=4), timeout=30)
    assert err.value.code() == INVALID and f"maximum of {LIMIT}" in err.value.details()
    chunks = [tpb.StreamRequest(model=MODEL, top_k=4, text="hello"), tpb.StreamRequest(text="hello" * 12)]
    answers_ = text.Stream(iter(chunks), timeout=30)
    assert next(answers_).decoded == "ohlol"
    with pytest.raises(grpc.RpcError) as err:
        next(answers_)
    assert err.value.code() == INVALID and f"maximum of {LIMIT}" in err.value.details()


def test_the_bound_is_never_below_the_encoded_size():
    rng = np.random.default_rng(0)
    for _ in range(20):
        outputs = [(f"out{i}" * int(rng.integers(1, 9)), rng.standard_normal(rng.integers(1, 40, rng.integers(1, 4)))
                    .astype(rng.choice(["float32", "float64", "int64", "int8"]))) for i in range(rng.integers(1, 4))]
        resp = InferResponse(model_name="m" * int(rng.integers(1, 300)), model_version="12", id="x" * 200,
                             outputs=outputs, parameters={"sequence_id": 7, "note": "y" * 30})
        size = convert.infer_response_to_proto(resp).ByteSize()
        assert size <= answers.response_bytes(resp) <= size + 1024
    with pytest.raises(InvalidArgument, match=f"{answers.response_bytes(resp)} bytes.*maximum of 100"):
        answers.check_response(resp, 100)
