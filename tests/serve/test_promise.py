"""Promise (serve/engine/promise.py) behaves as concurrent.futures.Future for what the engine uses."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError

import pytest

from rnnserve.serve.engine.promise import Promise


def test_is_a_future_and_completes_once_with_its_result():
    p = Promise()
    assert isinstance(p, Future) and not p.done() and not p.cancelled() and not p.running()
    p.set_result({"a": 1})
    assert p.done() and p.result() == {"a": 1} and p.exception() is None
    with pytest.raises(InvalidStateError):
        p.set_result(2)
    with pytest.raises(InvalidStateError):
        p.set_exception(ValueError("late"))
    assert p.result() == {"a": 1}


def test_exception_is_raised_by_result_and_returned_by_exception():
    p = Promise()
    err = ValueError("bad row")
    p.set_exception(err)
    assert p.exception() is err
    with pytest.raises(ValueError, match="bad row"):
        p.result()


def test_callbacks_run_once_in_order_and_at_once_when_already_done():
    p = Promise()
    seen = []
    p.add_done_callback(lambda f: seen.append(("first", f.result())))
    p.add_done_callback(lambda f: seen.append(("second", f.result())))
    assert seen == []
    p.set_result(7)
    assert seen == [("first", 7), ("second", 7)]
    p.add_done_callback(lambda f: seen.append(("late", f.result())))
    assert seen[-1] == ("late", 7) and len(seen) == 3


def test_a_failing_callback_is_logged_and_the_others_still_run(caplog):
    p = Promise()
    seen = []

    def boom(_f):
        raise RuntimeError("callback broke")

    p.add_done_callback(boom)
    p.add_done_callback(lambda f: seen.append(f.result()))
    with caplog.at_level(logging.ERROR, logger="rnnserve.serve.engine.promise"):
        p.set_result("ok")
    assert seen == ["ok"]
    assert [str(r.exc_info[1]) for r in caplog.records if r.exc_info] == ["callback broke"]


def test_result_times_out_while_pending_then_wakes_when_completed_from_another_thread():
    p = Promise()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        p.result(timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    got = []
    waiter = threading.Thread(target=lambda: got.append(p.result(timeout=10)))
    waiter.start()
    time.sleep(0.05)
    assert waiter.is_alive()   # really blocked
    p.set_result("answer")
    waiter.join(5)
    assert got == ["answer"]


def test_cancel_until_done():
    p = Promise()
    seen = []
    p.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert p.cancel() and p.cancelled() and p.done() and seen == [True]
    assert p.cancel()   # again: still cancelled
    with pytest.raises(CancelledError):
        p.result()
    with pytest.raises(CancelledError):
        p.exception()
    with pytest.raises(InvalidStateError):
        p.set_result(1)
    done = Promise()
    done.set_result(1)
    assert not done.cancel() and done.result() == 1


def _race_once() -> list[int]:
    """Callbacks added from one thread while another completes the promise -> the callbacks run."""
    p = Promise()
    calls: list[int] = []
    go = threading.Barrier(2)

    def add():
        go.wait()
        for i in range(20):
            p.add_done_callback(lambda _f, i=i: calls.append(i))

    adder = threading.Thread(target=add)
    adder.start()
    go.wait()
    p.set_result(None)
    adder.join()
    return calls


def test_racing_completion_and_callbacks_lose_nothing():
    for _ in range(200):
        assert sorted(_race_once()) == list(range(20))   # each exactly once


def test_asyncio_wrap_future_takes_it():
    async def main():
        p = Promise()
        threading.Timer(0.02, p.set_result, args=("from a thread",)).start()
        got = await asyncio.wrap_future(p)
        failed = Promise()
        failed.set_exception(ValueError("no"))
        with pytest.raises(ValueError):
            await asyncio.wrap_future(failed)
        return got

    assert asyncio.run(main()) == "from a thread"
