"""Promise: a concurrent.futures.Future that is cheap to create and complete.

Every streamed step makes two of these (its Work's and its sequence step's), and completes them
on the batcher's completion thread. A concurrent.futures.Future builds a threading.Condition
(a Python object around a re-entrant lock) for each, and takes it on every call, whether or
not anybody blocks. A Promise takes one plain lock, and makes an Event only for a caller that
really blocks in result() or exception() (the text API's calls, ModelEngine.wait).

It is a Future subclass that overrides every public method and keeps none of Future's
internals: asyncio.wrap_future() takes it (it only calls those methods), but
concurrent.futures.wait() and as_completed(), which read the internals, do not. The server
awaits it with its own LoopBridge (serve/frontend/bridge.py).

The semantics are Future's: callbacks run once, in the completing thread (or at once in
add_done_callback when already done), each one's error logged and not raised; completing it
twice raises InvalidStateError; result() re-raises the exception set, raises CancelledError
after cancel() and TimeoutError after `timeout` seconds. It has no "running" state: cancel()
succeeds until it is done.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

log = logging.getLogger(__name__)

_PENDING, _DONE, _CANCELLED = 0, 1, 2


class Promise(Future):
    __slots__ = ("_lock", "_phase", "_value", "_error", "_callbacks", "_event")

    def __init__(self) -> None:   # not Future.__init__: no Condition
        self._lock = threading.Lock()
        self._phase = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Future], object]] | None = None
        self._event: threading.Event | None = None

    def __repr__(self) -> str:
        return f"<Promise {('pending', 'done', 'cancelled')[self._phase]}>"

    # ---- reading ------------------------------------------------------------------------------
    def done(self) -> bool:
        return self._phase != _PENDING

    def cancelled(self) -> bool:
        return self._phase == _CANCELLED

    def running(self) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._phase == _CANCELLED:
            raise CancelledError()
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        if self._phase == _CANCELLED:
            raise CancelledError()
        return self._error

    def _wait(self, timeout: float | None) -> None:
        if self._phase != _PENDING:
            return
        with self._lock:
            if self._phase != _PENDING:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise TimeoutError()

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        with self._lock:
            if self._phase == _PENDING:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        _call(fn, self)

    # ---- completing -----------------------------------------------------------------------------
    def set_result(self, result: Any) -> None:
        self._complete(_DONE, result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._complete(_DONE, None, exception)

    def cancel(self) -> bool:
        """Cancel it unless it is done already; True when it is cancelled."""
        if self._phase == _CANCELLED:
            return True
        return self._complete(_CANCELLED, None, None, quiet=True)

    def set_running_or_notify_cancel(self) -> bool:
        raise NotImplementedError("a Promise has no running state")

    def _complete(self, state: int, result: Any, exception: BaseException | None, quiet: bool = False) -> bool:
        with self._lock:
            if self._phase != _PENDING:
                if quiet:
                    return False
                raise InvalidStateError(f"{self!r} is already done")
            self._phase, self._value, self._error = state, result, exception
            callbacks, self._callbacks = self._callbacks, None
            event = self._event
        if event is not None:
            event.set()
        if callbacks:
            for fn in callbacks:
                _call(fn, self)
        return True


def _call(fn: Callable[[Future], object], promise: Promise) -> None:
    try:
        fn(promise)
    except Exception:  # as concurrent.futures.Future: one callback's failure is logged, not raised
        log.exception("exception calling callback for %r", promise)
