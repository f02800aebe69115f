"""Bounds on what the front end holds open: streams (ModelStreamInfer, TextService.Stream,
Generate) and unary calls in progress. Past either bound a new call is answered
RESOURCE_EXHAUSTED at once, so an overload is an answer, never a hang. Health and
reflection are not counted: a probe still answers when every slot is taken.

All counting happens on the server's event loop thread, so plain integers suffice.
"""
from __future__ import annotations

from typing import Any

from rnnserve.serve.errors import ResourceExhausted

LIMITS_ATTR = "call_limits"
# The calls that stay open for many messages (a request stream, a response stream, or both).
STREAMING_METHODS = frozenset({"ModelStreamInfer", "Generate", "Stream"})


class CallLimits:
    def __init__(self, max_streams: int = 0, max_calls: int = 0):
        self.max_streams = max_streams    # 0 = no bound
        self.max_calls = max_calls
        self.streams = 0                  # open now
        self.calls = 0

    def enter(self, streaming: bool) -> None:
        """Count a call that starts (leave() when it ends); ResourceExhausted past the bound."""
        if streaming:
            if self.max_streams and self.streams >= self.max_streams:
                raise ResourceExhausted(f"too many open streams ({self.max_streams}, --max-streams); "
                                        "close some or retry later")
            self.streams += 1
        else:
            if self.max_calls and self.calls >= self.max_calls:
                raise ResourceExhausted(f"too many calls in progress ({self.max_calls}, "
                                        "--max-concurrent-calls); retry later")
            self.calls += 1

    def leave(self, streaming: bool) -> None:
        if streaming:
            self.streams -= 1
        else:
            self.calls -= 1


_UNBOUNDED = CallLimits()


def set_limits(servicer: Any, limits: CallLimits) -> None:
    setattr(servicer, LIMITS_ATTR, limits)


def limits_of(servicer: Any) -> CallLimits:
    return getattr(servicer, LIMITS_ATTR, _UNBOUNDED)
