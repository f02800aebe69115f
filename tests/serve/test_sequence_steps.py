"""Step ids and exactly once with the default memory store (in process, a real DataPlane over
real ONNX models): a repeat of the last applied step is answered from the kept answer, a gap
or an older id is FAILED_PRECONDITION naming the expected step, a non-numeric request id is no
step id. And the state store's record survives its encoding byte for byte."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from rnnserve.serve.dataplane.validation import check_parameters, step_id
from rnnserve.serve.engine.statestore import SeqRecord, decode, encode, open_store
from rnnserve.serve.errors import FailedPrecondition, InvalidArgument
from rnnserve.serve.wire.types import InferRequest
from tests.fixtures import make_dataplane

MODEL = "charlm"


def step(dp, seq_id, tokens, *, start=False, end=False, request_id="", **params):
    req = InferRequest(model_name=MODEL, inputs={"tokens": tokens}, id=request_id,
                       parameters={"sequence_id": seq_id, "sequence_start": start, "sequence_end": end, **params})
    return dict(dp.infer(req).outputs)


def test_repeat_is_answered_once_and_gaps_are_refused(charlm_dataplane):
    dp = charlm_dataplane
    tokens = np.random.default_rng(0).integers(0, 32, size=(1, 12), dtype=np.int64)
    whole = dict(dp.infer(InferRequest(model_name=MODEL, inputs={"tokens": tokens})).outputs)["logits"]
    a = step(dp, 71, tokens[:, :4], start=True, request_id="10")          # START as step 10
    b = step(dp, 71, tokens[:, 4:8], request_id="11")
    again = step(dp, 71, tokens[:, 4:8], request_id="11")                 # a retry: not applied twice
    np.testing.assert_array_equal(again["logits"], b["logits"])
    with pytest.raises(FailedPrecondition, match="got step 13, the server expects step 12"):
        step(dp, 71, tokens[:, 8:], sequence_step=13)
    with pytest.raises(FailedPrecondition, match="got step 10, the server expects step 12"):
        step(dp, 71, tokens[:, 8:], sequence_step=10)
    with pytest.raises(FailedPrecondition, match="step 11 was already applied with other inputs"):
        step(dp, 71, tokens[:, 8:], request_id="11")
    c = step(dp, 71, tokens[:, 8:], end=True, request_id="not-a-number")  # no step id: the next step
    got = np.concatenate([a["logits"], b["logits"], c["logits"]], axis=1)
    np.testing.assert_allclose(got, whole, atol=1e-5)


def test_steps_without_ids_are_numbered_by_the_server(charlm_dataplane):
    tokens = np.ones((1, 3), np.int64)
    step(charlm_dataplane, 72, tokens, start=True)
    step(charlm_dataplane, 72, tokens)
    with pytest.raises(FailedPrecondition, match="step 1 was already applied and its answer was not kept"):
        step(charlm_dataplane, 72, tokens, sequence_step=1)
    step(charlm_dataplane, 72, tokens, end=True, sequence_step=2)


def test_step_id_sources():
    params = check_parameters({"sequence_id": 1, "sequence_step": 5})
    assert step_id(params, "9") == 5                  # the parameter wins over the request id
    assert step_id(check_parameters({"sequence_id": 1}), "9") == 9
    assert step_id(check_parameters({"sequence_id": 1}), "req-9") is None
    assert step_id(check_parameters({"sequence_id": 1}), "9" * 19) is None
    with pytest.raises(InvalidArgument, match="'sequence_step' must be a non-negative integer"):
        check_parameters({"sequence_id": 1, "sequence_step": -1})
    with pytest.raises(InvalidArgument, match="need a non-zero 'sequence_id'"):
        check_parameters({"sequence_step": 1})


def test_record_round_trip():
    rng = np.random.default_rng(1)
    rec = SeqRecord("m", "3", 2, 7, {"h0": rng.random((2, 2, 4), dtype=np.float32),
                                     "c0": rng.random((2, 2, 4), dtype=np.float32)},
                    {"logits": rng.random((2, 5, 9)).astype(np.float16), "ids": np.arange(3)}, "ab12", False, "t")
    back = decode(encode(rec), "t")
    assert (back.model, back.version, back.batch, back.step, back.digest, back.ended, back.token) == \
        ("m", "3", 2, 7, "ab12", False, "t")
    for got, want in ((back.states, rec.states), (back.answer, rec.answer)):
        assert list(got) == list(want)
        for name in want:
            assert got[name].dtype == want[name].dtype
            np.testing.assert_array_equal(got[name], want[name])
    assert decode(encode(SeqRecord("m", "1", 1, 0, ended=True))).answer is None


def test_store_urls():
    assert not open_store("memory").shared
    with pytest.raises(ValueError, match="must be 'memory' or redis://"):
        open_store("postgres://db")


def test_a_sequence_stays_on_its_version_across_a_reload(charlm_built, tmp_path):
    """A version added mid-sequence takes new sequences; the live one goes on, exact, on its own."""
    repo = str(tmp_path / "repo")
    shutil.copytree(os.path.join(charlm_built.path, MODEL, "1"), os.path.join(repo, MODEL, "1"))
    dp = make_dataplane(repo)
    try:
        tokens = np.random.default_rng(3).integers(0, 32, size=(1, 9), dtype=np.int64)
        v1_whole = dict(dp.infer(InferRequest(model_name=MODEL, inputs={"tokens": tokens})).outputs)["logits"]
        parts = [step(dp, 81, tokens[:, :3], start=True)["logits"]]
        shutil.copytree(os.path.join(charlm_built.path, MODEL, "2"), os.path.join(repo, MODEL, "2"))
        dp.repo.poll()
        assert dp.repo.ready_versions(MODEL) == ["1", "2"]
        parts.append(step(dp, 81, tokens[:, 3:6])["logits"])
        new = dp.infer(InferRequest(model_name=MODEL, inputs={"tokens": tokens[:, :3]}, parameters={
            "sequence_id": 82, "sequence_start": True}))
        assert new.model_version == "2"                     # a new sequence starts on the new version
        last = dp.infer(InferRequest(model_name=MODEL, inputs={"tokens": tokens[:, 6:]}, parameters={
            "sequence_id": 81, "sequence_end": True}))
        assert last.model_version == "1"
        parts.append(dict(last.outputs)["logits"])
        np.testing.assert_allclose(np.concatenate(parts, axis=1), v1_whole, atol=1e-5)
    finally:
        dp.close()


def test_shared_store_routes_a_step_to_the_version_in_its_record(charlm_built, redis_server, tmp_path):
    """Two in-process data planes sharing Redis: a step reaching the one that never saw the
    sequence loads it, on the version its record names, after a newer version appeared."""
    repo = str(tmp_path / "repo")
    shutil.copytree(os.path.join(charlm_built.path, MODEL, "1"), os.path.join(repo, MODEL, "1"))
    planes = [make_dataplane(repo, state_store=redis_server.url) for _ in range(2)]
    try:
        a, b = planes
        tokens = np.random.default_rng(4).integers(0, 32, size=(2, 8), dtype=np.int64)
        whole = dict(a.infer(InferRequest(model_name=MODEL, inputs={"tokens": tokens})).outputs)["logits"]
        parts = [step(a, "v-stay", tokens[:, :4], start=True, sequence_step=0)["logits"]]
        shutil.copytree(os.path.join(charlm_built.path, MODEL, "2"), os.path.join(repo, MODEL, "2"))
        for dp in planes:
            dp.repo.poll()
        last = b.infer(InferRequest(model_name=MODEL, inputs={"tokens": tokens[:, 4:]}, parameters={
            "sequence_id": "v-stay", "sequence_end": True, "sequence_step": 1}))
        assert last.model_version == "1"
        parts.append(dict(last.outputs)["logits"])
        np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-5)
    finally:
        for dp in planes:
            dp.close()
