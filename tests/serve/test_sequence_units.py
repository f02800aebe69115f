"""Many-sequence requests as units (SequenceManager.submit_rows) over real exported models and
real onnxruntime, no gRPC: every row must equal its sequence run alone step by step, whether
the request ran as one Work (its sequences all free, or pipelined behind earlier units) or
row by row (a unit dissolved because a row was dropped), and whatever single steps of the
same sequences were queued in between. Over the wire: tests/serve/test_sequence_rows.py;
with a Redis store: tests/e2e/test_statestore.py."""
from __future__ import annotations

import time

import numpy as np
import pytest

from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.sequences import SequenceManager
from rnnserve.serve.errors import DeadlineExceeded, InvalidArgument, Unavailable
from tests.batching_models import GatedRun, Runs, build_models

ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("units"), names=["lstm", "gru"])


class Alone:
    """Each sequence run alone, one step at a time, with the state carried here."""

    def __init__(self, model):
        self.m, self.states = model, {}

    def step(self, key, tokens: np.ndarray, start: bool) -> np.ndarray:
        if start or key not in self.states:
            self.states[key] = self.m.zero(1)
        out = self.m.alone(tokens.reshape(1, -1), self.states[key])
        self.states[key] = tuple(out[n] for n in self.m.io.state_outputs)
        return out["logits"][0]


def _manager(m, run=None, **kwargs):
    runs = Runs()
    batcher = Batcher("units", run or m.run, m.io, max_batch_size=64, on_run=runs, **kwargs)
    return batcher, SequenceManager("units", batcher, m.io, m.zero, max_sequences=64), runs


def _rows(sm, keys, tokens, start=None, end=None):
    n = len(keys)
    return sm.submit_rows(keys, start or [False] * n, end or [False] * n, {"tokens": tokens})


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_pipelined_units_each_run_as_one_work(models, arch):
    """Staggered STARTs and ENDs, a START that restarts a live sequence, every request queued
    before the first is answered: each request is one run, each row its sequence alone."""
    m = models[arch]
    batcher, sm, runs = _manager(m)
    rng = np.random.default_rng(1)
    keys = [1, 2, 3, "four", 5]
    steps = 6
    tokens = rng.integers(0, 12, (len(keys), steps, 2)).astype(np.int64)
    start = [[t == 0 or (k == 3 and t == 3) for k in keys] for t in range(steps)]
    end = [[t == steps - 1 for _ in keys] for t in range(steps)]
    try:
        futures = [_rows(sm, keys, tokens[:, t], start[t], end[t]) for t in range(steps)]
        alone = Alone(m)
        for t, fut in enumerate(futures):
            logits = fut.result(timeout=30)["logits"]
            for i, key in enumerate(keys):
                np.testing.assert_allclose(logits[i], alone.step(key, tokens[i, t], start[t][i]), atol=ATOL, rtol=0)
        assert runs.execution_count == steps and runs.batch_sizes == {len(keys)}
        assert sm.live() == 0   # the ENDs freed every sequence
    finally:
        sm.close()
        batcher.close()


def test_busy_rows_and_single_steps_keep_each_sequences_order(models):
    """A unit whose sequences are busy (one held in a run, one with a single step queued) waits
    for them; single steps queued behind it run after it; every row is exact."""
    m = models["lstm"]
    gated = GatedRun(m)
    batcher, sm, runs = _manager(m, run=gated)
    rng = np.random.default_rng(2)
    tok = lambda: rng.integers(0, 12, (1, 3)).astype(np.int64)   # noqa: E731
    alone = Alone(m)
    expected, futures = [], []

    def single(key, start=False):
        t = tok()
        futures.append(sm.submit(key, {"tokens": t}, start=start, end=False))
        expected.append([alone.step(key, t[0], start)])

    def unit(keys, start=None):
        t = np.concatenate([tok() for _ in keys])
        futures.append(_rows(sm, keys, t, start))
        expected.append([alone.step(k, t[i], bool(start and start[i])) for i, k in enumerate(keys)])

    try:
        single("a", start=True)              # runs, held at the gate: "a" is busy
        assert gated.entered.wait(10)
        single("b", start=True)              # queued: "b" busy too
        unit(["c", "a", "b"], start=[True, False, False])   # waits for "a" and "b"
        single("b")                          # behind the unit's row of "b"
        unit(["b", "c", "d"], start=[False, False, True])   # behind both
        single("c")
        gated.gate.set()
        for fut, want in zip(futures, expected):
            logits = fut.result(timeout=30)["logits"]
            for i, row in enumerate(want):
                np.testing.assert_allclose(logits[i], row, atol=ATOL, rtol=0)
        assert max(runs.batch_sizes) >= 3   # the units ran as one Work each
    finally:
        gated.gate.set()
        sm.close()
        batcher.close()


def test_a_dropped_row_runs_the_other_rows_alone(models):
    """A row whose sequence an earlier END freed fails the request, naming the row; the unit's
    other rows still run (as single steps) and their sequences go on exactly."""
    m = models["gru"]
    batcher, sm, _ = _manager(m)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 12, (3, 3, 1)).astype(np.int64)
    alone = Alone(m)
    try:
        first = _rows(sm, [7, 8], tokens[:2, 0], start=[True, True], end=[True, False])   # 7 ends
        second = _rows(sm, [8, 7], tokens[:2, 1])    # queued before the END ran
        first.result(timeout=30)
        alone.step(7, tokens[0, 0], True)
        alone.step(8, tokens[1, 0], True)
        with pytest.raises(InvalidArgument, match=r"row 1: sequence 7 ended"):
            second.result(timeout=30)
        alone.step(8, tokens[0, 1], False)           # row 0 of `second` was applied
        third = _rows(sm, [8, 9], tokens[:2, 2], start=[False, True]).result(timeout=30)["logits"]
        np.testing.assert_allclose(third[0], alone.step(8, tokens[0, 2], False), atol=ATOL, rtol=0)
        np.testing.assert_allclose(third[1], alone.step(9, tokens[1, 2], True), atol=ATOL, rtol=0)
        assert sm.live() == 2
    finally:
        sm.close()
        batcher.close()


def test_refused_units_change_nothing(models):
    m = models["lstm"]
    batcher, sm, runs = _manager(m)
    tokens = np.arange(4, dtype=np.int64).reshape(2, 2)
    alone = Alone(m)
    try:
        _rows(sm, ["x"], tokens[:1], start=[True]).result(timeout=30)
        alone.step("x", tokens[0], True)
        with pytest.raises(InvalidArgument, match=r"row 1: sequence 'y' is not active.*START is required"):
            _rows(sm, ["x", "y"], tokens)
        sm.submit("wide", {"tokens": np.zeros((2, 1), np.int64)}, start=True, end=False).result(timeout=30)
        with pytest.raises(InvalidArgument, match=r"row 1: sequence 'wide' started with batch 2"):
            _rows(sm, ["x", "wide"], tokens)
        with pytest.raises(InvalidArgument, match="one row per request"):
            _rows(sm, ["x", "x"], tokens)
        assert runs.execution_count == 2 and sm.live() == 2
        got = _rows(sm, ["x"], tokens[1:]).result(timeout=30)["logits"][0]
        np.testing.assert_allclose(got, alone.step("x", tokens[1], False), atol=ATOL, rtol=0)
    finally:
        sm.close()
        batcher.close()


def test_a_unit_that_cannot_run_fails_whole_and_changes_nothing(models):
    """Queue full, or the deadline passed before the run: the request fails, no row's step is
    applied, and the sequences go on from where they were."""
    m = models["lstm"]
    gated = GatedRun(m)
    batcher, sm, _ = _manager(m, run=gated, max_queue_size=1)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 12, (2, 3, 1)).astype(np.int64)
    alone = Alone(m)
    try:
        gated.gate.set()
        _rows(sm, ["p", "q"], tokens[:, 0], start=[True, True]).result(timeout=30)
        [alone.step(k, tokens[i, 0], True) for i, k in enumerate(["p", "q"])]
        gated.gate.clear()
        gated.entered.clear()
        held = sm.submit("other", {"tokens": tokens[0, 0:1]}, start=True, end=False)
        assert gated.entered.wait(10)          # running, at the gate
        filler = sm.submit("filler", {"tokens": tokens[0, 0:1]}, start=True, end=False)   # fills the queue
        with pytest.raises(Unavailable, match="queue full"):
            _rows(sm, ["p", "q"], tokens[:, 1]).result(timeout=30)
        gated.gate.set()
        held.result(timeout=30)
        filler.result(timeout=30)
        gated.gate.clear()
        gated.entered.clear()
        held = sm.submit("other", {"tokens": tokens[0, 1:2]}, start=False, end=False)
        assert gated.entered.wait(10)
        late = sm.submit_rows(["p", "q"], [False, False], [False, False], {"tokens": tokens[:, 1]},
                              deadline=time.monotonic() + 0.05)
        time.sleep(0.1)
        gated.gate.set()
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=30)
        held.result(timeout=30)
        got = _rows(sm, ["q", "p"], tokens[::-1, 2]).result(timeout=30)["logits"]
        np.testing.assert_allclose(got[0], alone.step("q", tokens[1, 2], False), atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[1], alone.step("p", tokens[0, 2], False), atol=ATOL, rtol=0)
    finally:
        gated.gate.set()
        sm.close()
        batcher.close()
