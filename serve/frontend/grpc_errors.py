"""The one place exceptions become gRPC status codes (DESIGN.md's error map).

serve.errors.* carry the name of their status code and a message meant for the
client. Anything else is a bug: the client gets INTERNAL with a generic message
and a request id, and the traceback goes only to the log under that id. No
exception ever takes the process down.

Use `@handles_errors` on every servicer method (unary or streaming responses);
ModelStreamInfer, which answers errors in-stream, uses `status_for` directly.

Because the status of every call is decided here, so is the outcome of every
inference request for the metrics: a servicer with a `request_observer` attribute
(`set_observer`; the server sets it to Metrics.observe_request when metrics are on)
gets `observer(method, model, version, code name, seconds)` once per request of the
INFERENCE_METHODS, and ModelStreamInfer reports each streamed request with `report`.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from rnnserve.serve.errors import ServeError

logger = logging.getLogger(__name__)

RequestObserver = Callable[[str, str, str, str, float], None]   # method, model, version, code, seconds
OBSERVER_ATTR = "request_observer"
# Calls that are one inference request each (ModelStreamInfer reports per streamed request itself).
INFERENCE_METHODS = frozenset({"ModelInfer", "Predict", "Generate", "Score", "Stream"})


def code_for(exc: BaseException | None) -> grpc.StatusCode:
    """The status an outcome gets: OK for None, the serve.errors code, else INTERNAL."""
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, ServeError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


def status_for(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """-> (status code, message for the client). Logs what the client does not see."""
    code = code_for(exc)
    if isinstance(exc, ServeError):
        message = str(exc) or exc.__class__.__name__
        logger.debug("%s -> %s: %s", method, code.name, message)
        return code, message
    request_id = uuid.uuid4().hex[:12]
    logger.error("%s failed (request id %s)", method, request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error (request id {request_id})"


# -- request outcomes for the metrics ----------------------------------------------------------
def set_observer(servicer: Any, observer: RequestObserver | None) -> None:
    setattr(servicer, OBSERVER_ATTR, observer)


def observer_of(servicer: Any) -> RequestObserver | None:
    return getattr(servicer, OBSERVER_ATTR, None)


def _field(message: Any, *names: str) -> str:
    """The first of `names` that the protobuf message has (model_name / model, ...), else ""."""
    fields = getattr(getattr(message, "DESCRIPTOR", None), "fields_by_name", {})
    for name in names:
        if name in fields:
            return getattr(message, name)
    return ""


def report(observer: RequestObserver | None, method: str, request: Any, code: grpc.StatusCode,
           t0: float, answer: Any = None) -> None:
    """Tell the observer one request's outcome (t0: time.perf_counter() at its arrival). The
    version is the one the answer names, else the one the request named. Never raises."""
    if observer is None:
        return
    try:
        model = _field(request, "model_name", "model")
        version = _field(answer, "model_version", "version") or _field(request, "model_version", "version")
        observer(method, model, version, code.name, time.perf_counter() - t0)
    except Exception:  # noqa: BLE001 - metrics must never break serving
        logger.exception("request observer failed")


class _Seen:
    """The request (the first message of a request stream) and the last answer of one call."""

    def __init__(self, request: Any):
        self.request = request if hasattr(request, "DESCRIPTOR") else None
        self.answer = None

    def requests(self, iterator):
        for message in iterator:
            if self.request is None:
                self.request = message
            yield message

    def answers(self, generator):
        with contextlib.closing(generator):   # closing the call closes the servicer's generator
            for answer in generator:
                self.answer = answer
                yield answer


# -- the decorator -------------------------------------------------------------------------------
def _abort(context: grpc.ServicerContext, exc: Exception, method: str):
    code, message = status_for(exc, method)
    context.abort(code, message)   # raises; grpc answers the call with this status


def handles_errors(func):
    """Decorate a servicer method: exceptions -> a gRPC status, never a crash."""
    method = func.__qualname__
    observed = func.__name__ in INFERENCE_METHODS
    if inspect.isgeneratorfunction(func):
        @functools.wraps(func)
        def stream_wrapper(self, request, context):
            t0, seen, code = time.perf_counter(), _Seen(request), grpc.StatusCode.CANCELLED
            if observed and seen.request is None:
                request = seen.requests(request)
            try:
                answers = func(self, request, context)
                yield from seen.answers(answers) if observed else answers
                code = grpc.StatusCode.OK if context.is_active() else grpc.StatusCode.CANCELLED
            except Exception as exc:  # noqa: BLE001 - the one catch-all, by design
                if not context.is_active():   # client gone: nobody to answer
                    logger.debug("%s: client went away (%s)", method, exc.__class__.__name__)
                    return
                code = code_for(exc)
                _abort(context, exc, method)
            finally:   # also when the call is closed under us (GeneratorExit): CANCELLED
                if observed:
                    report(observer_of(self), func.__name__, seen.request, code, t0, seen.answer)
        return stream_wrapper

    @functools.wraps(func)
    def unary_wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            answer = func(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the one catch-all, by design
            if observed:
                report(observer_of(self), func.__name__, request, code_for(exc), t0)
            _abort(context, exc, method)
        if observed:
            report(observer_of(self), func.__name__, request, grpc.StatusCode.OK, t0, answer)
        return answer
    return unary_wrapper
