"""Long sequence steps in time chunks (serve/engine/chunking.py through SequenceManager._run),
on real exported models and real onnxruntime, in process: a long START, a long step that
continues it and a many-sequence unit with long rows each run as one run per chunk, and
equal the same steps run whole, as do the steps after them; a repeated step id is answered
with the whole step's outputs (those its request read); a chain cancelled between chunks
applies nothing; with a Redis store a chunked step is written once, whole (a unit once per
row), goes on on another data plane, and one computed from a stale copy is reloaded and
run again."""
from __future__ import annotations

import numpy as np
import pytest

from rnnserve.serve.engine.chunking import steps_per_chunk
from rnnserve.serve.engine.model_engine import wait
from rnnserve.serve.errors import Cancelled, FailedPrecondition
from rnnserve.serve.wire.types import InferRequest
from tests.fixtures import CHARLM_VOCAB, CHUNK_BUDGET, CHUNK_STEPS, make_dataplane

ROWS, STEPS, BUDGET = 3, CHUNK_STEPS, CHUNK_BUDGET
ATOL = 1e-5


def _tokens(rows: int, steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(CHARLM_VOCAB), (rows, steps), dtype=np.int64)


def _runs(plane, model: str) -> int:
    return plane.model_statistics(model, plane.engine(model).inst.version)[0].execution_count


def _chunks(plane, model: str, tokens: np.ndarray) -> int:
    chunk = steps_per_chunk(plane.engine(model).io, {"tokens": tokens}, BUDGET)
    assert chunk is not None and chunk < tokens.shape[1]
    return -(-tokens.shape[1] // chunk)


def _step(plane, model, seq_id, tokens, *, start=False, end=False, step_id=None):
    params = {"sequence_id": seq_id, "sequence_start": start, "sequence_end": end}
    if step_id is not None:
        params["sequence_step"] = step_id
    return dict(plane.infer(InferRequest(model_name=model, inputs={"tokens": tokens}, parameters=params)).outputs)


def _assert_equal(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        assert np.max(np.abs(got[name] - ref[name])) <= ATOL, name


@pytest.mark.parametrize("model", ["charlm", "chargru"])   # a 2-layer LSTM (h and c), a GRU
def test_long_steps_chunked_equal_whole_and_replay_whole(chunk_planes, model):
    """A long START with a step id, its replay, a short step, a long END step: one run per
    chunk, every answer equal to the whole runs'; the replay runs nothing and is whole."""
    chunked, whole = chunk_planes
    long_a, short, long_b = _tokens(ROWS, STEPS, 1), _tokens(ROWS, 8, 2), _tokens(ROWS, STEPS, 3)
    seq = f"long-{model}"
    before = _runs(chunked, model)
    first = _step(chunked, model, seq, long_a, start=True, step_id=5)
    assert _runs(chunked, model) - before == _chunks(chunked, model, long_a)
    _assert_equal(first, _step(whole, model, seq, long_a, start=True, step_id=5))
    assert first["logits"].shape == (ROWS, STEPS, len(CHARLM_VOCAB))

    before = _runs(chunked, model)
    _assert_equal(_step(chunked, model, seq, long_a, start=True, step_id=5), first)   # a retry
    assert _runs(chunked, model) == before

    _assert_equal(_step(chunked, model, seq, short, step_id=6), _step(whole, model, seq, short, step_id=6))
    before = _runs(chunked, model)
    last = _step(chunked, model, seq, long_b, end=True)
    assert _runs(chunked, model) - before == _chunks(chunked, model, long_b)
    _assert_equal(last, _step(whole, model, seq, long_b, end=True))
    assert chunked.engine(model).sequences.live() == 0   # the END freed it


def test_a_step_without_id_keeps_only_the_outputs_it_is_asked_for(chunk_planes):
    chunked, whole = chunk_planes
    engine = chunked.engine("charlm")
    tokens = _tokens(ROWS, STEPS, 4)
    out = wait(engine.submit_step("state-only", {"tokens": tokens}, start=True, end=False,
                                  outputs=engine.io.state_outputs))
    assert set(out) == set(engine.io.state_outputs)   # the chunks' logits were dropped
    ref = _step(whole, "charlm", "state-only", tokens, start=True)
    for name in out:
        assert np.max(np.abs(out[name] - ref[name])) <= ATOL, name
    nxt = _tokens(ROWS, 8, 5)
    _assert_equal(_step(chunked, "charlm", "state-only", nxt, end=True),
                  _step(whole, "charlm", "state-only", nxt, end=True))


def test_unit_with_long_rows_chunked_equals_whole(chunk_planes):
    """Four sequences, one long row each, in one request: one run per chunk; then a short unit."""
    chunked, whole = chunk_planes
    ids = [901, 902, 903, 904]
    starts, ends = [True] * 4, [False] * 4
    tokens, short = _tokens(len(ids), STEPS, 6), _tokens(len(ids), 8, 7)
    got, ref = [], []
    for plane, answers in ((chunked, got), (whole, ref)):
        engine = plane.engine("chargru")
        before = _runs(plane, "chargru")
        answers.append(wait(engine.submit_rows(ids, starts, ends, {"tokens": tokens})))
        runs = _runs(plane, "chargru") - before
        assert runs == (_chunks(plane, "chargru", tokens) if plane is chunked else 1)
        answers.append(wait(engine.submit_rows(ids, [False] * 4, [True] * 4, {"tokens": short})))
    for g, r in zip(got, ref):
        _assert_equal(g, r)


def test_a_chain_cancelled_between_chunks_applies_nothing(chunk_planes):
    """Cancelled after two chunks: the step fails and is not applied; run again with the same
    id it equals the whole run."""
    chunked, whole = chunk_planes
    engine = chunked.engine("chargru")
    head, long = _tokens(ROWS, 8, 8), _tokens(ROWS, STEPS, 9)
    for plane in chunk_planes:
        _step(plane, "chargru", "cut", head, start=True, step_id=0)
    checks = []

    def cancelled_after_two() -> bool:   # the Batcher asks once per chunk, before it runs
        checks.append(1)
        return len(checks) > 2

    before = _runs(chunked, "chargru")
    fut = engine.submit_step("cut", {"tokens": long}, start=False, end=False, step_id=1,
                             is_cancelled=cancelled_after_two)
    with pytest.raises(Cancelled):
        fut.result(timeout=60)
    assert _runs(chunked, "chargru") - before == 2
    _assert_equal(_step(chunked, "chargru", "cut", long, step_id=1), _step(whole, "chargru", "cut", long, step_id=1))
    tail = _tokens(ROWS, 8, 10)
    _assert_equal(_step(chunked, "chargru", "cut", tail, end=True), _step(whole, "chargru", "cut", tail, end=True))


def test_redis_store_gets_the_whole_step_once(charlm_repo, redis_server, chunk_planes):
    """Chunked steps on two data planes sharing Redis: each step is one compare-and-set write;
    a retry on the other plane is answered from the store with the whole logits and no run; a
    step computed from a stale copy conflicts, is reloaded and runs again, exactly."""
    _, whole = chunk_planes
    a, b = (make_dataplane(charlm_repo, max_seq_len=STEPS, max_run_bytes=BUDGET, warmup=False,
                           state_store=redis_server.url) for _ in range(2))
    seq = "shared-long"
    ids = [0, 1, 2, None]   # the last step carries no id: a's stale copy takes it for step 2
    steps = [_tokens(ROWS, STEPS, 11 + i) for i in range(len(ids))]
    ref = [_step(whole, "charlm", seq, t, start=i == 0, end=i == 3, step_id=ids[i]) for i, t in enumerate(steps)]
    try:
        with redis_server.client() as r:
            def step(plane, i, writes):
                calls = r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
                before = _runs(plane, "charlm")
                _assert_equal(_step(plane, "charlm", seq, steps[i], start=i == 0, end=i == 3, step_id=ids[i]), ref[i])
                assert _runs(plane, "charlm") - before == writes * _chunks(plane, "charlm", steps[i])
                assert r.info("commandstats")["cmdstat_evalsha"]["calls"] - calls == writes

            step(a, 0, 1)
            step(a, 1, 1)
            step(b, 1, 0)   # a retry, from Redis
            step(b, 2, 1)
            step(a, 3, 2)   # a stale copy: its write conflicts, it reloads and runs the step again
    finally:
        a.close()
        b.close()


def test_redis_store_gets_a_chunked_unit_once_per_row(charlm_repo, redis_server, chunk_planes):
    """A unit of two sequences with long rows, chunked on one data plane: one write per row;
    the other data plane continues both rows exactly."""
    _, whole = chunk_planes
    a, b = (make_dataplane(charlm_repo, max_seq_len=STEPS, max_run_bytes=BUDGET, warmup=False,
                           state_store=redis_server.url) for _ in range(2))
    ids = [9101, 9102]
    tokens, short = _tokens(len(ids), STEPS, 20), _tokens(len(ids), 8, 21)
    try:
        ref = [wait(whole.engine("chargru").submit_rows(ids, [True] * 2, [False] * 2, {"tokens": tokens})),
               wait(whole.engine("chargru").submit_rows(ids, [False] * 2, [True] * 2, {"tokens": short}))]
        with redis_server.client() as r:
            calls = r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
            before = _runs(a, "chargru")
            _assert_equal(wait(a.engine("chargru").submit_rows(ids, [True] * 2, [False] * 2, {"tokens": tokens})),
                          ref[0])
            assert _runs(a, "chargru") - before == _chunks(a, "chargru", tokens) > 1
            assert r.info("commandstats")["cmdstat_evalsha"]["calls"] - calls == len(ids)
        _assert_equal(wait(b.engine("chargru").submit_rows(ids, [False] * 2, [True] * 2, {"tokens": short})), ref[1])
    finally:
        a.close()
        b.close()


def test_a_step_id_keeps_only_the_outputs_read(chunk_planes):
    """A long step with an id asking for the state alone keeps no logits (chunked or whole);
    its retry gets the state, a retry asking for the logits is refused naming them."""
    for plane in chunk_planes:
        tokens = _tokens(ROWS, STEPS, 13)
        req = InferRequest(model_name="chargru", inputs={"tokens": tokens}, requested_outputs=["hn"],
                           parameters={"sequence_id": "kept", "sequence_start": True, "sequence_step": 3})
        first = dict(plane.infer(req).outputs)
        np.testing.assert_array_equal(dict(plane.infer(req).outputs)["hn"], first["hn"])
        req.requested_outputs = None
        with pytest.raises(FailedPrecondition, match="step 3 was already applied.*not logits"):
            plane.infer(req)
        _step(plane, "chargru", "kept", tokens[:, :8], end=True)
