"""Long runs of stateful models in time chunks (serve/engine/chunking.py): the chunked answer
equals the whole run (logits and final states) on real exported models, chunking really
happens (ModelStatistics counts one run per chunk), outputs the caller does not read are
not kept, short requests are never split, and a cancelled or expired chain runs no chunk."""
from __future__ import annotations

import time

import numpy as np
import pytest

from rnnserve.serve.engine.chunking import MIN_CHUNK_STEPS, steps_per_chunk
from rnnserve.serve.engine.model_engine import wait
from rnnserve.serve.errors import Cancelled, DeadlineExceeded
from rnnserve.serve.wire.types import InferRequest
from tests.fixtures import CHARLM_VOCAB, CHUNK_BUDGET, CHUNK_STEPS

ROWS, STEPS, BUDGET = 3, CHUNK_STEPS, CHUNK_BUDGET


def _tokens(rows: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(CHARLM_VOCAB), (rows, steps), dtype=np.int64)


def _runs(plane, model: str) -> int:
    return plane.model_statistics(model, plane.engine(model).inst.version)[0].execution_count


def _infer(plane, model: str, tokens, outputs=None, **inputs):
    answer = plane.infer(InferRequest(model_name=model, inputs={"tokens": tokens, **inputs},
                                      requested_outputs=outputs))
    return dict(answer.outputs)


@pytest.mark.parametrize("model", ["charlm", "chargru"])   # a 2-layer LSTM (h and c), a GRU
def test_chunked_equals_whole_run(chunk_planes, model):
    chunked, whole = chunk_planes
    engine = chunked.engine(model)
    tokens = _tokens(ROWS, STEPS)
    chunk = steps_per_chunk(engine.io, {"tokens": tokens}, BUDGET)
    assert chunk is not None and MIN_CHUNK_STEPS <= chunk < STEPS
    chunks = -(-STEPS // chunk)
    state_in = {n: np.random.default_rng(1).standard_normal(s, dtype=np.float32)
                for n, s in ((n, engine.inst.state_shape(ROWS, n)) for n in engine.io.state_inputs)}
    before = _runs(chunked, model)
    got = _infer(chunked, model, tokens, **state_in)
    assert _runs(chunked, model) - before == chunks
    before = _runs(whole, model)
    ref = _infer(whole, model, tokens, **state_in)
    assert _runs(whole, model) - before == 1
    assert set(got) == set(ref) == {"logits", *engine.io.state_outputs}
    for name in ref:
        assert got[name].shape == ref[name].shape
        assert np.max(np.abs(got[name] - ref[name])) <= 1e-5, name


def test_state_only_keeps_no_logits(chunk_planes):
    chunked, whole = chunk_planes
    engine = chunked.engine("charlm")
    tokens = _tokens(ROWS, STEPS, seed=2)
    fut, _cancel = engine.submit({"tokens": tokens}, engine.zero_states(ROWS), need_state=True, outputs=())
    out = wait(fut)
    assert set(out) == set(engine.io.state_outputs)      # the chunks' logits were dropped
    ref = _infer(whole, "charlm", tokens, outputs=list(engine.io.state_outputs))
    for name in ref:
        assert np.max(np.abs(out[name] - ref[name])) <= 1e-5, name


def test_short_requests_and_stateless_models_run_whole(chunk_planes):
    chunked, _ = chunk_planes
    for model, rows, steps in (("charlm", 1, 24), ("bigru", ROWS, STEPS)):   # short; bidirectional: no state
        before = _runs(chunked, model)
        out = _infer(chunked, model, _tokens(rows, steps))
        assert out["logits"].shape == (rows, steps, len(CHARLM_VOCAB))
        assert _runs(chunked, model) - before == 1, model


def test_text_api_runs_chunked_and_exact(chunk_planes):
    chunked, whole = chunk_planes
    text = "".join(CHARLM_VOCAB[i] for i in _tokens(1, STEPS, seed=3)[0])
    before = _runs(chunked, "charlm")
    got = chunked.score("charlm", text)
    assert _runs(chunked, "charlm") - before > 1
    assert abs(got.log_likelihood - whole.score("charlm", text).log_likelihood) <= 1e-3


def test_a_cancelled_or_expired_chain_stops(chunk_planes):
    chunked, _ = chunk_planes
    engine = chunked.engine("chargru")
    tokens = _tokens(ROWS, STEPS, seed=4)
    before = _runs(chunked, "chargru")
    with engine.batcher.together():        # the first chunk stays queued until the block ends
        fut, cancel = engine.submit({"tokens": tokens}, engine.zero_states(ROWS), need_state=True)
        assert cancel()                    # taken out of the queue: no chunk runs
    with pytest.raises(Cancelled):
        fut.result(timeout=30)
    with engine.batcher.together():
        fut, _ = engine.submit({"tokens": tokens}, engine.zero_states(ROWS), need_state=True,
                               deadline=time.monotonic() + 0.05)
        time.sleep(0.1)
    with pytest.raises(DeadlineExceeded):
        fut.result(timeout=30)
    assert _runs(chunked, "chargru") == before
