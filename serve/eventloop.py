"""The event loop every gRPC call of rnnserve-server runs on: uvloop when it is installed, else asyncio's.

A streamed step costs the loop several callbacks, futures and task wake-ups (the read, the
answer, the write), and under load those run back to back on one thread. uvloop implements
the loop in C over libuv, so each costs less; grpc.aio runs on it unchanged (it watches its
completion queue's socket with `add_reader`). `--event-loop asyncio` keeps the standard
library's loop, and `auto` (the default) falls back to it where uvloop is not installed
(it has no Windows build). The README's Benchmarks compare the two.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging

log = logging.getLogger(__name__)

EVENT_LOOPS = ("auto", "uvloop", "asyncio")   # --event-loop


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(kind: str) -> str:
    """"uvloop" or "asyncio": the loop an `--event-loop` value gives here."""
    if kind not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {kind!r}")
    if kind == "auto":
        return "uvloop" if uvloop_installed() else "asyncio"
    return kind


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new loop of the kind `kind` resolves to (logged)."""
    chosen = resolve(kind)
    if chosen == "uvloop":
        import uvloop
        log.info("event loop: uvloop %s%s", uvloop.__version__, " (chosen)" if kind == "auto" else "")
        return uvloop.new_event_loop()
    log.info("event loop: asyncio%s", " (uvloop is not installed)" if kind == "auto" else "")
    return asyncio.new_event_loop()
