"""From the engine's threads to the event loop: awaiting a concurrent.futures.Future.

The Batcher completes futures on its own threads. `LoopBridge.wrap(fut)` gives an
asyncio future on the server's loop that completes with it, without a thread per
waiter. Completions arriving together (one onnxruntime run answers many requests)
share one wake-up of the loop: the first posts a drain with call_soon_threadsafe,
the rest only append to the list it drains.

`outputs()` awaits a queued request's outputs the way ModelEngine.wait() does for a
blocking caller: a cancelled call leaves the queue, and a request still queued when
its deadline passes is dropped with DEADLINE_EXCEEDED.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from rnnserve.serve.errors import Cancelled, DeadlineExceeded


class LoopBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._loop_thread = threading.get_ident()   # made on the loop (Server)
        self._lock = threading.Lock()
        self._ready: list[tuple[Future, asyncio.Future]] = []

    def wrap(self, fut: Future) -> asyncio.Future:
        """An asyncio future (of this loop; call on the loop) completed like `fut`."""
        waiter = self._loop.create_future()
        if fut.done():
            _transfer(fut, waiter)
        else:
            fut.add_done_callback(lambda done: self._post(done, waiter))
        return waiter

    def _post(self, fut: Future, waiter: asyncio.Future) -> None:
        if threading.get_ident() == self._loop_thread:   # a run on the loop itself (Batcher.release(here=True))
            _transfer(fut, waiter)
            return
        with self._lock:
            self._ready.append((fut, waiter))
            first = len(self._ready) == 1
        if first:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:   # the loop is closed: the server has stopped, nobody waits
                pass

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for fut, waiter in ready:
            _transfer(fut, waiter)


def outcome(fut: Future) -> Any:
    """The result of a done `fut`; its exception raised; Cancelled when it was cancelled."""
    if fut.cancelled():
        raise Cancelled("the request was cancelled")
    return fut.result()


def _transfer(fut: Future, waiter: asyncio.Future) -> None:
    if waiter.done():   # the awaiting call was cancelled
        return
    try:
        waiter.set_result(outcome(fut))
    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting call
        waiter.set_exception(exc)


async def outputs(bridge: LoopBridge, fut: Future, cancel: Callable[[], bool] | None = None,
                  deadline: float | None = None):
    """The result of `fut` (a request's outputs). cancel() takes the request out of the queue
    (True if it was still queued); it is called when the awaiting call is cancelled, and at the
    deadline, after which a request already running is still awaited."""
    waiter = bridge.wrap(fut)
    try:
        if deadline is not None and not waiter.done():
            done, _ = await asyncio.wait((waiter,), timeout=max(0.0, deadline - time.monotonic()))
            if not done and cancel is not None and cancel():
                waiter.cancel()
                raise DeadlineExceeded("the request's deadline passed while it waited in the queue")
        return await waiter
    except asyncio.CancelledError:
        waiter.cancel()
        if cancel is not None:
            cancel()
        raise


class Coalescer:
    """Requests the loop handles in one turn reach each model's Batcher together: the first
    one holds the batcher (Batcher.hold) until the end of the turn (and a pass more, below), so
    its scheduler cannot start a run with the first request alone while the rest are still being
    read. With one event loop reading every request, that is what lets concurrent requests share runs.

    The hold lasts one more pass of the loop than the turn itself: messages that grpc's poller
    thread received while the turn ran are read in that pass and join the run. Released at the
    end of the turn itself, the run would start just before they are read, and they would wait
    for the next one (bench.stream_threads' 4-stream load: about twice the rows a run this way,
    and less CPU a step). A second extra pass costs more in delay than it adds in rows."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._held: dict[int, Any] = {}   # id(batcher) -> batcher, held until the pass after the turn

    def hold(self, batcher) -> None:
        """(On the loop.) Hold the batcher (Batcher.hold) until the pass after this turn of the loop,
        when the batch may then run on the loop (Batcher.release(here=True), if it is quick).
        Unless its recent traffic came one request at a time (Batcher.lone) and its last run was
        not quick: then the request goes to a scheduler at once, as it would have run alone anyway."""
        held = self._held
        if id(batcher) in held or (batcher.lone() and not batcher.quick()):
            return
        batcher.hold()
        held[id(batcher)] = batcher
        if len(held) == 1:
            self._loop.call_soon(self._next_pass)

    def _next_pass(self) -> None:
        self._loop.call_soon(self._release)

    def _release(self) -> None:
        held, self._held = self._held, {}
        for batcher in held.values():
            batcher.release(here=True)
