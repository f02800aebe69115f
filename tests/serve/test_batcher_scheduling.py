"""The Batcher's scheduling and threads over a real exported model and a real onnxruntime
session: backpressure, deadlines, cancellation, the queue delay, inline runs, instances and
the completion thread, and quick runs on the event loop (release(here=True))."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.modelio import Work
from rnnserve.serve.engine.runkinds import QuickRuns
from rnnserve.serve.errors import Cancelled, DeadlineExceeded, Unavailable
from rnnserve.serve.eventloop import new_event_loop
from rnnserve.serve.frontend.bridge import Coalescer, LoopBridge
from tests.batching_models import CountingRun, GatedRun, Runs, build_models, work


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("scheduling"), names=["lstm"])


def test_backpressure_deadline_and_cancel(models):
    m = models["lstm"]
    run = GatedRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=1, max_queue_size=3)
    try:
        toks = np.ones((1, 5), np.int64)
        busy = b.submit(work(toks, m.zero(1)))
        assert run.entered.wait(10)              # the scheduler is inside a run
        late = work(toks, m.zero(1), deadline=time.monotonic() + 0.01)
        cancelled = work(toks, m.zero(1))
        ok = work(toks, m.zero(1))
        for w in (late, cancelled, ok):
            b.submit(w)
        with pytest.raises(Unavailable, match="queue full"):
            b.submit(work(toks, m.zero(1)))
        assert b.cancel(cancelled) and b.queue_depth() == 2
        with pytest.raises(Cancelled):
            cancelled.future.result(timeout=1)
        time.sleep(0.05)                         # let the deadline pass while queued
        run.gate.set()
        busy.result(timeout=30)
        with pytest.raises(DeadlineExceeded):
            late.future.result(timeout=30)
        np.testing.assert_array_equal(ok.future.result(timeout=30)["logits"],
                                      m.alone(toks, m.zero(1))["logits"])
    finally:
        run.gate.set()
        b.close()


def test_no_added_wait_at_concurrency_one(models):
    """A lone request never waits for a batch that cannot fill, even with a long
    queue delay configured."""
    m = models["lstm"]
    runs = Runs()
    b = Batcher("lstm", m.run, m.io, max_batch_size=32, max_queue_delay_us=3_000_000, on_run=runs)
    try:
        toks = np.ones((1, 8), np.int64)
        t0 = time.monotonic()
        for _ in range(3):
            b.submit(work(toks, m.zero(1))).result(timeout=30)
        assert time.monotonic() - t0 < 3.0       # one 3 s delay would exceed this
        assert runs.execution_count == 3
    finally:
        b.close()


def test_inline_runs_on_the_callers_thread_only_when_idle(models):
    """A blocking caller at concurrency 1 runs its own work (no hand-off); when the
    model is busy the work queues and is batched as usual."""
    m = models["lstm"]
    seen = []

    def run(feeds):
        seen.append(threading.current_thread().name)
        return m.run(feeds)

    gated = GatedRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=8)
    try:
        toks = np.ones((1, 6), np.int64)
        fut = b.submit(work(toks, m.zero(1)), inline=True)
        assert fut.done() and seen == [threading.current_thread().name]
        np.testing.assert_array_equal(fut.result()["logits"], m.alone(toks, m.zero(1))["logits"])
    finally:
        b.close()
    runs = Runs()
    b = Batcher("lstm", gated, m.io, max_batch_size=8, on_run=runs)
    try:
        first = b.submit(work(toks, m.zero(1)))          # the scheduler thread takes it
        assert gated.entered.wait(10)
        queued = b.submit(work(toks, m.zero(1)), inline=True)
        assert not queued.done() and b.queue_depth() == 1  # busy: it queued instead of running
        gated.gate.set()
        first.result(timeout=30)
        queued.result(timeout=30)
        assert runs.execution_count == 2
    finally:
        gated.gate.set()
        b.close()


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_bound_the_runs_in_progress(models, instances):
    """--instances N: up to N onnxruntime runs of one model at once, each on its own batch;
    beyond that, work queues. Every answer still equals the request run alone."""
    m = models["lstm"]
    run = CountingRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=8, max_queue_delay_us=0, instances=instances)
    try:
        toks = [np.full((1, 4), i, np.int64) for i in range(3)]
        futs = [b.submit(work(toks[0], m.zero(1)))]
        assert run.wait_running(1)
        futs.append(b.submit(work(toks[1], m.zero(1))))
        assert run.wait_running(instances)        # a second scheduler took it, if there is one
        time.sleep(0.1)
        assert run.running == instances and b.queue_depth() == 2 - instances
        futs.append(b.submit(work(toks[2], m.zero(1))))
        for _ in range(3):
            run.gate.release()
        for t, fut in zip(toks, futs):
            np.testing.assert_array_equal(fut.result(timeout=30)["logits"], m.alone(t, m.zero(1))["logits"])
        assert run.peak == instances
    finally:
        for _ in range(3):
            run.gate.release()
        b.close()
    with pytest.raises(ValueError):
        Batcher("lstm", m.run, m.io, instances=0)


def test_work_queued_during_a_run_goes_without_the_queue_delay(models):
    """The queue delay is only for an idle model about to see a burst: work that queued while a
    run was in progress goes the moment the model is free, even when recent batches were bigger."""
    m = models["lstm"]
    run = CountingRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=8, max_queue_delay_us=3_000_000)
    try:
        toks = np.ones((1, 5), np.int64)
        first = b.submit(work(toks, m.zero(1)))
        assert run.wait_running(1)
        four = [b.submit(work(toks, m.zero(1))) for _ in range(4)]   # queue while the model is busy
        run.gate.release()
        first.result(timeout=30)
        assert run.wait_running(1)                 # the four went at once, as one batch
        assert run.rows == [1, 4]
        late = b.submit(work(toks, m.zero(1)))     # recent batches held 4 rows; this one is alone
        t0 = time.monotonic()
        run.gate.release()
        run.gate.release()
        for fut in four + [late]:
            fut.result(timeout=30)
        assert time.monotonic() - t0 < 2.0         # the 3 s delay for 3 more rows was not taken
        assert run.rows == [1, 4, 1]
    finally:
        for _ in range(3):
            run.gate.release()
        b.close()


def test_inline_only_while_recent_runs_held_one_row(models):
    """A caller that finds the model idle runs inline only while recent runs held a single row:
    under load (recent runs batched more) it queues, so rows arriving right behind it can share
    its run; once eight runs in a row held one row, callers run inline again."""
    m = models["lstm"]
    threads = []

    def run(feeds):
        threads.append(threading.current_thread().name)
        return m.run(feeds)

    b = Batcher("lstm", run, m.io, max_batch_size=8, max_queue_delay_us=0)
    try:
        me = threading.current_thread().name
        b.submit(work(np.ones((3, 5), np.int64), m.zero(3)), inline=True).result(timeout=30)
        toks = np.ones((1, 5), np.int64)
        for _ in range(9):
            b.submit(work(toks, m.zero(1)), inline=True).result(timeout=30)
        assert threads[0] == me                                    # nothing recent: inline
        assert all(t.startswith("batcher-lstm-") for t in threads[1:9])  # a 3-row run is recent
        assert threads[9] == me                                    # eight 1-row runs since
    finally:
        b.close()


def test_the_next_run_does_not_wait_for_callers_to_be_completed(models):
    """Finished runs are handed to the batcher's completion thread: a slow completion (here a
    caller's done-callback that blocks) does not hold up the next run."""
    m = models["lstm"]
    run = CountingRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=1)
    release = threading.Event()
    try:
        toks = np.ones((1, 5), np.int64)
        first = b.submit(work(toks, m.zero(1)))
        first.add_done_callback(lambda _f: release.wait(30))
        second = b.submit(work(toks, m.zero(1)))
        run.gate.release()                                   # the first run goes through
        until = time.monotonic() + 10
        while len(run.rows) < 2 and time.monotonic() < until:
            time.sleep(0.005)
        assert run.rows == [1, 1]        # the second run started while the first's callback blocks
        release.set()
        run.gate.release()
        np.testing.assert_array_equal(second.result(timeout=30)["logits"], m.alone(toks, m.zero(1))["logits"])
        np.testing.assert_array_equal(first.result(timeout=30)["logits"], m.alone(toks, m.zero(1))["logits"])
    finally:
        release.set()
        run.gate.release()
        run.gate.release()
        b.close()


def test_a_run_that_outlives_close_still_answers_its_caller(models):
    """close() stops the completion thread after its timeout; a run still in progress then
    completes its own callers."""
    m = models["lstm"]
    run = GatedRun(m)
    b = Batcher("lstm", run, m.io)
    try:
        toks = np.ones((1, 5), np.int64)
        fut = b.submit(work(toks, m.zero(1)))
        assert run.entered.wait(10)
        b.close(timeout=0.1)
        run.gate.set()
        np.testing.assert_array_equal(fut.result(timeout=30)["logits"], m.alone(toks, m.zero(1))["logits"])
    finally:
        run.gate.set()
        b.close()


def test_a_run_with_nothing_queued_behind_it_is_answered_by_its_scheduler(models):
    """No hand-off to the completion thread when no next run waits (concurrency 1): the
    scheduler that ran the work completes it. With work queued behind a run, the completion
    thread answers it while the scheduler starts the next run."""
    m = models["lstm"]
    gated = GatedRun(m)
    b = Batcher("lstm", gated, m.io, max_batch_size=1)
    answered: dict[str, str] = {}
    try:
        toks = np.ones((1, 5), np.int64)
        works = {name: work(toks, m.zero(1)) for name in ("first", "second")}
        for name, w in works.items():
            w.future.add_done_callback(lambda _f, name=name: answered.setdefault(
                name, threading.current_thread().name))
        b.submit(works["first"])
        assert gated.entered.wait(10)
        b.submit(works["second"])            # queued behind the first run
        gated.gate.set()
        for w in works.values():
            np.testing.assert_array_equal(w.future.result(timeout=30)["logits"], m.alone(toks, m.zero(1))["logits"])
        assert answered == {"first": "batcher-lstm-done", "second": "batcher-lstm-0"}
    finally:
        gated.gate.set()
        b.close()


def test_hold_keeps_work_queued_until_release(models):
    """hold() keeps the scheduler off the queue until release(), so work queued meanwhile
    shares one run; lone() says when holding is pointless (nothing queued or running and the
    last runs held one row each)."""
    m = models["lstm"]
    runs = Runs()
    b = Batcher("lstm", m.run, m.io, max_batch_size=8, on_run=runs)
    try:
        toks = np.ones((1, 5), np.int64)
        assert b.lone()
        b.hold()
        futures = [b.submit(work(toks, m.zero(1))) for _ in range(3)]
        time.sleep(0.05)
        assert b.queue_depth() == 3 and not any(f.done() for f in futures) and not b.lone()
        b.release()
        for f in futures:
            np.testing.assert_array_equal(f.result(timeout=30)["logits"], m.alone(toks, m.zero(1))["logits"])
        assert runs.execution_count == 1 and runs.inference_count == 3
        assert not b.lone()                  # the last run held 3 rows: company is likely
    finally:
        b.close()


class _Threads:
    """The real session run, noting the thread of each run."""

    def __init__(self, model):
        self.model, self.names = model, []

    def __call__(self, feeds):
        self.names.append(threading.current_thread().name)
        return self.model.run(feeds)


def _settled(b: Batcher, timeout: float = 30.0) -> None:
    """Wait until no run is counted in progress. A scheduler thread answers its callers before it
    counts its run as over, so a caller can get its answer while the batcher still holds no free
    instance for a quick run."""
    deadline = time.monotonic() + timeout
    while b._running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not b._running


def _held_round(b: Batcher, m, seed: int, n: int = 3):
    """n works queued under one hold, then release(here=True) -> (their futures, their tokens)."""
    toks = [np.full((1, 2), seed + i, np.int64) for i in range(n)]
    b.hold()
    futs = [b.submit(work(t, m.zero(1))) for t in toks]
    b.release(here=True)
    return futs, toks


def test_release_here_runs_a_quick_batch_on_the_releasing_thread(models):
    """The event loop's release (Coalescer): once a run has shown how long the model takes, a held
    batch estimated within --inline-run-us runs on the releasing thread, as one run, exactly;
    otherwise (no estimate yet, over the budget, budget 0, a state store write before answering)
    a scheduler thread runs it."""
    m = models["lstm"]
    here = threading.current_thread().name
    run = _Threads(m)
    runs = Runs()
    b = Batcher("lstm", run, m.io, max_batch_size=8, on_run=runs, inline_run_us=10_000_000)
    try:
        assert not b.quick()
        futs, _ = _held_round(b, m, 0)           # nothing learned yet: the scheduler
        for f in futs:
            f.result(timeout=30)
        _settled(b)
        assert run.names == ["batcher-lstm-0"]
        assert b.quick()
        futs, toks = _held_round(b, m, 5)
        assert all(f.done() for f in futs) and run.names[1:] == [here]
        assert runs.records[-1].rows == 3
        for f, t in zip(futs, toks):
            np.testing.assert_array_equal(f.result()["logits"], m.alone(t, m.zero(1))["logits"])
    finally:
        b.close()
    for budget, before_answer in ((1, None), (0, None), (10_000_000, lambda items, results: None)):
        run = _Threads(m)
        b = Batcher("lstm", run, m.io, max_batch_size=8, inline_run_us=budget, before_answer=before_answer)
        try:
            for seed in (0, 5):
                for f in _held_round(b, m, seed)[0]:
                    f.result(timeout=30)
            assert run.names == ["batcher-lstm-0"] * 2, (budget, run.names)
            assert not b.quick()
        finally:
            b.close()


def test_the_event_loop_runs_quick_batches_at_the_end_of_its_turn(models):
    """What the gRPC front end does with tensor requests: requests submitted in one turn of the loop,
    each holding the batcher through the Coalescer, run together when the Coalescer releases it, on
    the loop's own thread once the model has shown it is quick; the LoopBridge then completes their awaiting
    coroutines without a thread hand-off. Over the budget, batches still go to a scheduler thread."""
    m = models["lstm"]

    async def turn(b: Batcher, seed: int):
        coalesce, bridge = Coalescer(asyncio.get_running_loop()), LoopBridge(asyncio.get_running_loop())
        toks = [np.full((1, 2), seed + i, np.int64) for i in range(3)]
        futs = []
        for t in toks:
            coalesce.hold(b)
            futs.append(b.submit(work(t, m.zero(1))))
        outs = await asyncio.gather(*(bridge.wrap(f) for f in futs))
        return threading.current_thread().name, toks, outs

    for budget in (10_000_000, 1):
        run = _Threads(m)
        b = Batcher("lstm", run, m.io, max_batch_size=8, inline_run_us=budget)
        try:
            asyncio.run(turn(b, 0))                   # the first run teaches the estimate
            _settled(b)
            loop_thread, toks, outs = asyncio.run(turn(b, 5))
            assert run.names == ["batcher-lstm-0", loop_thread if budget > 1 else "batcher-lstm-0"]
            for t, out in zip(toks, outs):
                np.testing.assert_array_equal(out["logits"], m.alone(t, m.zero(1))["logits"])
        finally:
            b.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_request_read_in_the_pass_after_the_turn_joins_its_run(models, loop_kind):
    """The Coalescer holds the batcher one pass of the loop past the turn that first held it: a
    request the loop reads in that next pass (grpc hands over messages that arrived meanwhile)
    shares the run, which then runs on the loop; one read a pass later still gets a run of its own."""
    m = models["lstm"]
    run, rows = _Threads(m), []

    def counted(feeds):
        rows.append(int(feeds["tokens"].shape[0]))
        return run(feeds)

    b = Batcher("lstm", counted, m.io, max_batch_size=8, inline_run_us=10_000_000)
    toks = [np.full((1, 2), 7 + i, np.int64) for i in range(3)]

    async def passes(b: Batcher):
        loop = asyncio.get_running_loop()
        coalesce, bridge = Coalescer(loop), LoopBridge(loop)
        futs = []

        def read(t, then=None):
            coalesce.hold(b)
            futs.append(b.submit(work(t, m.zero(1))))
            if then is not None:
                loop.call_soon(*then)

        read(toks[0], (read, toks[1], (read, toks[2])))   # this turn, the next pass, the one after
        while len(futs) < 3:
            await asyncio.sleep(0)
        return threading.current_thread().name, await asyncio.gather(*(bridge.wrap(f) for f in futs))

    loop = new_event_loop(loop_kind)
    try:
        loop.run_until_complete(passes(b))            # the first runs teach the estimate
        _settled(b)
        run.names.clear()
        rows.clear()
        loop_thread, outs = loop.run_until_complete(passes(b))
    finally:
        loop.close()
        b.close()
    assert run.names == [loop_thread, loop_thread]
    assert rows == [2, 1]
    for t, out in zip(toks, outs):
        np.testing.assert_array_equal(out["logits"], m.alone(t, m.zero(1))["logits"])


def test_the_quick_run_estimate_is_the_least_cost_per_cell_of_recent_runs():
    """QuickRuns (serve/engine/runkinds.py): nothing is quick before a run is timed; then a batch is
    quick when the least ns per row x step of the last RECENT runs times its cells is within the
    budget, so one slow run (a wait for the GIL counted in) does not stop quick runs."""
    quick = QuickRuns(budget_ns=100_000)
    assert not quick.known() and not quick.fits(1) and not quick.last_fits()
    one_step = [Work({}, rows=3, seq_len=0), Work({}, rows=1, seq_len=0)]   # 4 rows x 1 step
    quick.learn(one_step, compute_ns=40_000)                              # 10 us a cell
    assert quick.known() and quick.last_fits()
    assert quick.fits(10) and not quick.fits(11)
    quick.learn(one_step, compute_ns=4_000_000)                           # slow: the least stays
    assert quick.fits(10) and quick.last_fits()                           # the last run's 4 cells: 40 us
    for _ in range(QuickRuns.RECENT):
        quick.learn([Work({}, rows=2, seq_len=5)], compute_ns=200_000)   # 20 us a cell, 10 cells
    assert quick.fits(5) and not quick.fits(6) and not quick.last_fits()
    assert not QuickRuns(budget_ns=0).fits(1)
