"""tritonclient.grpc, unchanged, against our server: health, metadata, config,
statistics, infer (with and without state inputs) and the stream. Outputs must be
bit-identical to an in-process onnxruntime run of the same model.onnx file."""
from __future__ import annotations

import os
import queue

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.fixtures import HELLO_MODELS, serving


@pytest.fixture(scope="module")
def client(hello_server):
    c = tc.InferenceServerClient(hello_server[1])
    yield c
    c.close()


@pytest.fixture(scope="module")
def sessions(hello_repo):
    """In-process onnxruntime sessions of the very files the server loaded."""
    return {m: ort.InferenceSession(os.path.join(hello_repo, m, "1", "model.onnx"),
                                    providers=["CPUExecutionProvider"]) for m in HELLO_MODELS}


def _state_shape(session, name, batch):
    layers, _, hidden = next(i.shape for i in session.get_inputs() if i.name == name)
    return (layers, batch, hidden)


def _reference(session, tokens, states=None, outputs=None):
    """onnxruntime in this process; omitted states are zeros, as the server feeds them."""
    feeds = {"tokens": tokens}
    for inp in session.get_inputs()[1:]:
        feeds[inp.name] = (states or {}).get(
            inp.name, np.zeros(_state_shape(session, inp.name, tokens.shape[0]), np.float32))
    return session.run(outputs, feeds)


def _input(name, array, datatype):
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server.name == "rnnserve" and "model_configuration" in server.extensions
    for model in HELLO_MODELS:
        assert client.is_model_ready(model) and client.is_model_ready(model, "1")
        meta = client.get_model_metadata(model)
        assert meta.name == model and meta.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype) for t in meta.inputs][0] == ("tokens", "INT64")
        assert list(meta.inputs[0].shape) == [-1, -1]
        config = client.get_model_config(model).config
        assert config.name == model and config.max_batch_size == 0
        assert [i.name for i in config.input] == [t.name for t in meta.inputs]
        assert [o.name for o in config.output] == [t.name for t in meta.outputs]
        assert tc.model_config_pb2.DataType.Name(config.input[0].data_type) == "TYPE_INT64"
    as_json = client.get_model_metadata("rnn", as_json=True)
    assert as_json["name"] == "rnn" and as_json["versions"] == ["1"]


@pytest.mark.parametrize("model", HELLO_MODELS)
def test_model_config_as_the_data_plane_reports_it(hello_server, client, model):
    """Everything the data plane says about scheduling reaches tritonclient's ModelConfig."""
    info = hello_server[0].dataplane.model_config(model)
    config = client.get_model_config(model).config
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == \
        [(t.name, t.shape, t.optional) for t in info.inputs]
    if info.sequence_batching is not None:
        seq = config.sequence_batching
        assert config.WhichOneof("scheduling_choice") == "sequence_batching"
        assert [(s.input_name, s.output_name, list(s.dims)) for s in seq.state] == \
            [(s.input_name, s.output_name, s.dims) for s in info.sequence_batching["states"]]
        assert all(s.initial_state[0].zero_data for s in seq.state)
        if info.dynamic_batching is not None:
            assert seq.oldest.max_queue_delay_microseconds == \
                info.dynamic_batching["max_queue_delay_microseconds"]
    elif info.dynamic_batching is not None:
        assert list(config.dynamic_batching.preferred_batch_size) == \
            info.dynamic_batching["preferred_batch_size"]


def test_not_ready_and_errors(client):
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("rnn", "7")   # an unknown version is NOT_FOUND, not False
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    bad = _input("tokens", np.array([[0, 9]], dtype=np.int64), "INT64")
    with pytest.raises(InferenceServerException) as info:
        client.infer("rnn", [bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "out of range" in info.value.message()


@pytest.mark.parametrize("model", HELLO_MODELS)
def test_infer_bit_identical(client, sessions, model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, size=(3, 7), dtype=np.int64)
    result = client.infer(model, [_input("tokens", tokens, "INT64")])
    expected = _reference(sessions[model], tokens)
    names = [o.name for o in sessions[model].get_outputs()]
    for name, want in zip(names, expected):
        got = result.as_numpy(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), f"{model}.{name} differs"


@pytest.mark.parametrize("model", ["emb-lstm", "emb-gru", "rnn"])
def test_infer_with_state_bit_identical(client, sessions, model):
    session = sessions[model]
    state_names = [i.name for i in session.get_inputs() if i.name != "tokens"]
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 4, size=(2, 5), dtype=np.int64)
    states = {n: rng.standard_normal(_state_shape(session, n, 2)).astype(np.float32)
              for n in state_names}
    inputs = [_input("tokens", tokens, "INT64")] + [_input(n, s, "FP32") for n, s in states.items()]
    wanted = ["logits", "hn"]
    result = client.infer(model, inputs, outputs=[tc.InferRequestedOutput(n) for n in wanted])
    expected = _reference(session, tokens, states, wanted)
    assert set(result.get_response().outputs[i].name for i in range(2)) == set(wanted)
    for name, want in zip(wanted, expected):
        assert result.as_numpy(name).tobytes() == want.tobytes(), f"{model}.{name} differs"
    # carrying the state by hand: two halves == the whole
    whole = client.infer(model, [_input("tokens", tokens, "INT64")])
    first = client.infer(model, [_input("tokens", tokens[:, :2].copy(), "INT64")])
    state_inputs = [_input(n, first.as_numpy(n.replace("0", "n")), "FP32") for n in state_names]
    second = client.infer(model, [_input("tokens", tokens[:, 2:].copy(), "INT64"), *state_inputs])
    np.testing.assert_allclose(second.as_numpy("logits"), whole.as_numpy("logits")[:, 2:],
                               rtol=1e-5, atol=1e-6)


def test_messages_over_4_mib(hello_repo, sessions):
    """grpc's default limit is 4 MiB each way; the server raises it (tritonclient sends up to 2 GiB)."""
    tokens = np.random.default_rng(2).integers(0, 4, size=(70_000, 8), dtype=np.int64)  # 4.5 MB
    with serving(hello_repo, max_batch_size=70_000) as (_, address), tc.InferenceServerClient(address) as client:
        result = client.infer("emb-gru", [_input("tokens", tokens, "INT64")],
                              outputs=[tc.InferRequestedOutput("logits")])            # 9 MB back
    want = _reference(sessions["emb-gru"], tokens, outputs=["logits"])[0]
    assert result.as_numpy("logits").tobytes() == want.tobytes()


def test_stream_infer(client, sessions):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        tokens = np.array([[0, 1, 2, 2]], dtype=np.int64)
        client.async_stream_infer("emb-gru", [_input("tokens", tokens, "INT64")], request_id="a")
        client.async_stream_infer("emb-gru", [_input("tokens", tokens + 10, "INT64")],
                                  request_id="b")
        client.async_stream_infer("emb-gru", [_input("tokens", tokens, "INT64")], request_id="c")
        replies = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    (ok1, err1), (bad, err2), (ok2, err3) = replies
    assert err1 is None and err3 is None and bad is None
    assert "out of range" in err2.message()
    want = _reference(sessions["emb-gru"], tokens, outputs=["logits"])[0]
    assert ok1.as_numpy("logits").tobytes() == want.tobytes()
    assert ok1.get_response().id == "a" and ok2.get_response().id == "c"


def test_statistics_and_repository(client):
    stats = client.get_inference_statistics("emb-lstm")
    assert stats.model_stats[0].name == "emb-lstm"
    everything = client.get_inference_statistics()
    assert {s.name for s in everything.model_stats} == set(HELLO_MODELS)
    index = client.get_model_repository_index()
    assert {(m.name, m.state) for m in index.models} == {(m, "READY") for m in HELLO_MODELS}
