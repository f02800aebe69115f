"""Every input rule of the data plane: InvalidArgument with a message that says what is
wrong (NotFound for unknown models/versions), before onnxruntime runs, and the process
keeps serving afterwards. Real DataPlane, real exported models, real onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest

from rnnserve.serve.errors import InvalidArgument, NotFound
from rnnserve.serve.wire.types import InferRequest

LSTM = "emb-lstm"   # hello preset: vocab 4 (e h l o), state [2, batch, 8] for h0 and c0


def tokens(*shape, value=0):
    return np.full(shape, value, np.int64)


def state(batch, layers=2, hidden=8, dtype=np.float32):
    return np.zeros((layers, batch, hidden), dtype)


def infer(dp, inputs, model=LSTM, datatypes=None, outputs=None, parameters=None, version=""):
    return dp.infer(InferRequest(model_name=model, model_version=version, inputs=inputs,
                                 input_datatypes=datatypes or {}, requested_outputs=outputs,
                                 parameters=parameters or {}))


def assert_invalid(fn, *fragments):
    with pytest.raises(InvalidArgument) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- names -------------------------------------------------------------------------------------
def test_missing_tokens(hello_dataplane):
    assert_invalid(lambda: infer(hello_dataplane, {"h0": state(1)}), "missing input 'tokens'", LSTM)


def test_unknown_input(hello_dataplane):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": tokens(1, 3), "x0": state(1)}),
                   "unknown input 'x0'", "tokens, h0, c0")


def test_unknown_and_duplicate_output(hello_dataplane):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": tokens(1, 3)}, outputs=["probs"]),
                   "unknown output 'probs'", "logits, hn, cn")
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": tokens(1, 3)}, outputs=["hn", "hn"]),
                   "'hn' is requested twice")


def test_state_to_bidirectional_model(charlm_dataplane):
    assert_invalid(lambda: infer(charlm_dataplane, {"tokens": tokens(1, 3), "h0": state(1, 4, 12)},
                                 model="bigru"), "'bigru' is bidirectional", "no state inputs")


def test_unknown_model_and_version_are_not_found(hello_dataplane):
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        infer(hello_dataplane, {"tokens": tokens(1, 3)}, model="nope")
    with pytest.raises(NotFound, match="model 'emb-lstm' has no version '7'"):
        infer(hello_dataplane, {"tokens": tokens(1, 3)}, version="7")
    with pytest.raises(NotFound, match="nope"):
        hello_dataplane.predict_text("nope", "hello")


# -- datatypes and shapes ------------------------------------------------------------------------
def test_tokens_must_be_int64(hello_dataplane):
    t32 = np.zeros((1, 3), np.int32)
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": t32}, datatypes={"tokens": "INT32"}),
                   "input 'tokens' must be INT64, got INT32")
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": t32}), "must be INT64, got INT32")
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": np.zeros((1, 3), np.float32)}),
                   "must be INT64, got FP32")
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": t32}, datatypes={"tokens": "INT64"}),
                   "declared INT64 but its data is INT32")


def test_state_must_be_fp32(hello_dataplane):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": tokens(1, 3), "h0": state(1, dtype=np.float64)}),
                   "input 'h0' must be FP32, got FP64")


def test_not_a_tensor(hello_dataplane):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": [[1, 2]]}), "'tokens' must be a tensor")


@pytest.mark.parametrize("shape", [(3,), (1, 3, 1), ()])
def test_tokens_rank(hello_dataplane, shape):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": np.zeros(shape, np.int64)}),
                   "must have rank 2 [batch, seq]", str(list(shape)))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_seq(hello_dataplane, shape):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": np.zeros(shape, np.int64)}),
                   "batch and seq must be >= 1")


def test_seq_over_maximum(charlm_dataplane):
    assert_invalid(lambda: infer(charlm_dataplane, {"tokens": tokens(1, 65)}, model="charlm"),
                   "seq 65, over the server's maximum of 64")
    infer(charlm_dataplane, {"tokens": tokens(1, 64)}, model="charlm")  # the maximum itself is fine


@pytest.mark.parametrize("bad", [-1, 4, 2**40, -2**63])
def test_token_id_out_of_range(hello_dataplane, bad):
    t = tokens(2, 5)
    t[1, 3] = bad
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": t}),
                   f"token id {bad} at position [1, 3]", "valid ids are 0..3 (vocab size 4)")


def test_many_bad_ids_are_counted(hello_dataplane):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": np.array([[0, 9, -3, 2]])}),
                   "token id 9 at position [0, 1]", "2 ids out of range in all")


@pytest.mark.parametrize("shape, why", [((2, 2, 8), "batch 1"), ((1, 1, 8), "[2, 1, 8]"),
                                        ((2, 1, 7), "[2, 1, 8]"), ((2, 8), "[2, 1, 8]")])
def test_state_wrong_shape(hello_dataplane, shape, why):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": tokens(1, 3), "c0": np.zeros(shape, np.float32)}),
                   "state input 'c0' has shape", why)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_state_not_finite(hello_dataplane, bad):
    h0 = state(2)
    h0[1, 1, 3] = bad
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": tokens(2, 3), "h0": h0}),
                   "state input 'h0' contains NaN or Inf")


# -- reserved parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize("params, fragment", [
    ({"sequence_id": 1.5}, "'sequence_id' must be a non-negative integer or a string"),
    ({"sequence_id": True}, "'sequence_id' must be"),
    ({"sequence_id": -4}, "'sequence_id' must be"),
    ({"sequence_start": 1}, "'sequence_start' must be a bool"),
    ({"sequence_end": "yes"}, "'sequence_end' must be a bool"),
    ({"priority": -1}, "'priority' must be a non-negative integer"),
    ({"priority": "high"}, "'priority' must be a non-negative integer"),
    ({"timeout": 1.5}, "'timeout' must be a non-negative integer (microseconds)"),
    ({"timeout": -5}, "'timeout' must be"),
    ({"sequence_start": True}, "need a non-zero 'sequence_id'"),
])
def test_bad_parameters(hello_dataplane, params, fragment):
    assert_invalid(lambda: infer(hello_dataplane, {"tokens": tokens(1, 3)}, parameters=params), fragment)


def test_good_parameters_pass(hello_dataplane):
    params = {"priority": 3, "timeout": 10_000_000, "sequence_id": 0, "sequence_end": False,
              "custom": "ignored"}
    out = infer(hello_dataplane, {"tokens": tokens(1, 3)}, parameters=params)
    assert [name for name, _ in out.outputs] == ["logits", "hn", "cn"]


# -- text ----------------------------------------------------------------------------------------------
def test_characters_not_in_vocabulary_are_named(hello_dataplane):
    message = assert_invalid(lambda: hello_dataplane.predict_text(LSTM, "hezzoQ"))
    assert message == "characters not in the vocabulary of model 'emb-lstm': 'z', 'Q'"
    assert_invalid(lambda: hello_dataplane.score(LSTM, "hell\n"), r"'\n'")
    assert_invalid(lambda: hello_dataplane.generate(LSTM, "hex", 3), "model 'emb-lstm': 'x'")


def test_empty_text(hello_dataplane):
    assert_invalid(lambda: hello_dataplane.predict_text(LSTM, ""), "text must not be empty")
    assert_invalid(lambda: hello_dataplane.generate(LSTM, "", 3), "prompt must not be empty")
    assert_invalid(lambda: hello_dataplane.score(LSTM, ""), "text must not be empty")


def test_text_too_long(charlm_dataplane):
    assert_invalid(lambda: charlm_dataplane.predict_text("charlm", "a" * 65), "65 characters", "maximum of 64")


def test_score_needs_two_characters(hello_dataplane):
    assert_invalid(lambda: hello_dataplane.score(LSTM, "h"), "at least 2 characters")


@pytest.mark.parametrize("top_k", [-1, 101, 2.5])
def test_predict_top_k(hello_dataplane, top_k):
    assert_invalid(lambda: hello_dataplane.predict_text(LSTM, "hello", top_k=top_k),
                   "top_k must be an integer in 0..100")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(max_tokens=0), "max_tokens must be in 1..50"),
    (dict(max_tokens=51), "max_tokens must be in 1..50"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(stop=[""]), "stop must be a list of non-empty strings"),
    (dict(stop="ab"), "stop must be a list"),
])
def test_generate_arguments(charlm_dataplane, kwargs, fragment):
    args = dict(max_tokens=5) | kwargs
    # Errors are raised by the call itself, before any token is requested.
    assert_invalid(lambda: charlm_dataplane.generate("charlm", "hello", **args), fragment)


def test_bidirectional_cannot_generate_or_score(charlm_dataplane):
    assert_invalid(lambda: charlm_dataplane.generate("bigru", "hello", 5), "'bigru' is bidirectional",
                   "cannot generate")
    assert_invalid(lambda: charlm_dataplane.score("bigru", "hello"), "'bigru' is bidirectional", "cannot score")
    assert charlm_dataplane.predict_text("bigru", "hello").decoded  # predicting is fine


def test_still_serving_after_bad_inputs(hello_dataplane):
    for bad in (np.zeros((0, 3), np.int64), np.full((1, 2), -1, np.int64)):
        with pytest.raises(InvalidArgument):
            infer(hello_dataplane, {"tokens": bad})
    assert hello_dataplane.server_live() and hello_dataplane.predict_text(LSTM, "hello").decoded == "ohlol"
