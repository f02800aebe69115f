"""Lone runs: at concurrency 1, a long enough request runs on the model's lone session (more
threads, spinning while it runs); everything else runs on the shared one. Both are the same
graph, so the answers are bit-identical to an in-process onnxruntime session's.

Real models (charlm_repo), real onnxruntime sessions, a real DataPlane. Which session ran is
counted by wrapping each session's run() (the call still goes to onnxruntime).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.serve.engine.runkinds import LONE_MIN_STEPS
from rnnserve.serve.wire.types import InferRequest
from tests.fixtures import make_dataplane


class Counted:
    """A session whose run() calls are counted, then made as usual."""

    def __init__(self, session: ort.InferenceSession):
        self.session, self.calls = session, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)


@pytest.fixture()
def plane(charlm_repo):
    dp = make_dataplane(charlm_repo, lone_threads=2, wide_threads=1, max_queue_delay_us=0)
    inst = dp.engine("charlm").inst
    inst.session, inst.lone_session = Counted(inst.session), Counted(inst.lone_session)
    yield dp, inst
    dp.close()


def _infer(dp, tokens: np.ndarray) -> np.ndarray:
    resp = dp.infer(InferRequest(model_name="charlm", inputs={"tokens": tokens}))
    return dict(resp.outputs)["logits"]


def test_lone_sessions_exist_only_with_more_threads(charlm_repo):
    dp = make_dataplane(charlm_repo, lone_threads=1)
    try:
        assert dp.engine("charlm").inst.lone_session is None
    finally:
        dp.close()


def test_a_long_request_alone_runs_on_the_lone_session_bit_identical(plane, charlm_repo):
    dp, inst = plane
    reference = ort.InferenceSession(inst.path, providers=["CPUExecutionProvider"])
    tokens = np.random.default_rng(0).integers(0, 32, (1, LONE_MIN_STEPS * 3), dtype=np.int64)
    got = _infer(dp, tokens)
    assert inst.lone_session.calls == 1 and inst.session.calls == 0
    feeds = {"tokens": tokens, **dict(zip(inst.state_inputs, inst.zero_states(1)))}
    assert np.array_equal(got, reference.run(["logits"], feeds)[0])


def test_short_requests_stay_on_the_shared_session(plane):
    dp, inst = plane
    _infer(dp, np.zeros((1, LONE_MIN_STEPS - 1), np.int64))   # too short to spread
    _infer(dp, np.zeros((2, LONE_MIN_STEPS * 2), np.int64))   # two rows: not a lone request
    assert inst.lone_session.calls == 0 and inst.session.calls == 2


def test_merged_runs_and_the_runs_right_after_them_stay_on_the_shared_session(plane):
    """Requests queued together run as one merged run on the shared session, and a single request
    right after it (recent runs held many rows: load) does too; every answer equals the one the
    request gets alone on the lone session."""
    dp, inst = plane
    engine = dp.engine("charlm")
    rng = np.random.default_rng(1)
    requests = [rng.integers(0, 32, (1, 40), dtype=np.int64) for _ in range(12)]
    alone = [_infer(dp, t) for t in requests]
    assert inst.lone_session.calls == len(requests) and inst.session.calls == 0
    engine.batcher.hold()      # what the asyncio front end does for the requests of one loop turn
    try:
        futures = [engine.submit({"tokens": t}, engine.zero_states(1), need_state=False)[0] for t in requests]
    finally:
        engine.batcher.release()
    for fut, want in zip(futures, alone):
        assert np.array_equal(fut.result(timeout=30)["logits"], want)
    assert inst.session.calls == 1, "the held requests did not share one run"
    assert np.array_equal(_infer(dp, requests[0]), alone[0])
    assert inst.session.calls == 2 and inst.lone_session.calls == len(requests)


def test_no_lone_run_while_another_model_runs(plane):
    """A lone run wants every core: while another model's run is in progress, a request that would
    run lone takes the shared session instead (two lone runs at once would halve both)."""
    dp, inst = plane
    other = dp.engine("chargru").inst
    started, finished = threading.Event(), threading.Event()

    def long_run() -> None:
        started.set()
        other.run({"tokens": np.zeros((1, 600_000), np.int64)})
        finished.set()

    worker = threading.Thread(target=long_run)
    worker.start()
    started.wait()
    time.sleep(0.1)             # the other run is under way (it takes far longer than this test's request)
    _infer(dp, np.zeros((1, LONE_MIN_STEPS * 2), np.int64))
    busy = not finished.is_set()
    worker.join()
    assert busy, "the other model's run ended before the request: make it longer"
    assert inst.session.calls == 1 and inst.lone_session.calls == 0
    _infer(dp, np.zeros((1, LONE_MIN_STEPS * 2), np.int64))   # alone again: the lone session
    assert inst.lone_session.calls == 1
