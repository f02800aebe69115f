"""Wide runs: a batch of at least WIDE_MIN_ROWS rows over at least LONE_MIN_STEPS steps runs on
the model's wide session (more intra-op threads, never spinning); smaller or shorter batches run
on the shared one. Both are the same graph, and the answers are bit-identical to each request run
alone on the shared session (onnxruntime splits the rows across the threads, not the sums).

Real models (charlm_repo), real onnxruntime sessions, a real DataPlane. Which session ran is
counted by wrapping each session's run() (the call still goes to onnxruntime).
"""
from __future__ import annotations

import numpy as np
import pytest

from rnnserve.serve.engine.runkinds import LONE_MIN_STEPS, WIDE_MIN_ROWS
from tests.fixtures import make_dataplane
from tests.serve.test_lone_runs import Counted


@pytest.fixture()
def plane(charlm_repo):
    dp = make_dataplane(charlm_repo, lone_threads=1, wide_threads=2, max_queue_delay_us=0)
    engine = dp.engine("charlm")
    inst = engine.inst
    inst.session, inst.wide_session = Counted(inst.session), Counted(inst.wide_session)
    yield engine, inst
    dp.close()


def _together(engine, requests: list[np.ndarray]) -> list[np.ndarray]:
    """The requests queued together (what the asyncio front end does for one loop turn's requests)."""
    engine.batcher.hold()
    try:
        futures = [engine.submit({"tokens": t}, engine.zero_states(t.shape[0]), need_state=True)[0]
                   for t in requests]
    finally:
        engine.batcher.release()
    return [f.result(timeout=30) for f in futures]


def _alone(inst, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The request run by itself on the shared session, through the counted wrapper's session."""
    feeds = {"tokens": tokens, **dict(zip(inst.state_inputs, inst.zero_states(tokens.shape[0])))}
    return dict(zip(inst.output_names, inst.session.session.run(inst.output_names, feeds)))


@pytest.mark.parametrize("shape", [(WIDE_MIN_ROWS, 1, LONE_MIN_STEPS), (3, 4, 2 * LONE_MIN_STEPS)])
def test_a_wide_batch_runs_on_the_wide_session_and_equals_each_request_alone(plane, shape):
    """WIDE_MIN_ROWS one-row requests, or 3 requests of 4 rows, merged into one run."""
    engine, inst = plane
    count, rows, steps = shape
    rng = np.random.default_rng(count)
    requests = [rng.integers(0, 32, (rows, steps), dtype=np.int64) for _ in range(count)]
    got = _together(engine, requests)
    assert inst.wide_session.calls == 1 and inst.session.calls == 0
    for tokens, out in zip(requests, got):
        want = _alone(inst, tokens)
        for name in ("logits", *inst.state_outputs):   # the outputs and the final state
            np.testing.assert_array_equal(out[name], want[name])


def test_fewer_rows_or_fewer_steps_stay_on_the_shared_session(plane):
    engine, inst = plane
    few = [np.zeros((1, 2 * LONE_MIN_STEPS), np.int64)] * (WIDE_MIN_ROWS - 1)
    short = [np.zeros((1, LONE_MIN_STEPS - 1), np.int64)] * (2 * WIDE_MIN_ROWS)
    _together(engine, few)
    _together(engine, short)
    assert inst.session.calls == 2 and inst.wide_session.calls == 0


@pytest.mark.parametrize("threads", [(1, 1), (2, 2), (2, 1)])
def test_wide_sessions_exist_only_with_more_threads_than_the_shared_one(charlm_repo, threads):
    """(intra-op threads, wide-run threads): a wide session only when it has more threads."""
    intra, wide = threads
    dp = make_dataplane(charlm_repo, intra_op_threads=intra, wide_threads=wide)
    try:
        assert dp.engine("charlm").inst.wide_session is None
    finally:
        dp.close()
