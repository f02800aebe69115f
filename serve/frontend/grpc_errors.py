"""The one place exceptions become gRPC status codes (the error map in docs/design.md).

serve.errors.* carry the name of their status code and a message meant for the
client. Anything else is a bug: the client gets INTERNAL with a generic message
and a request id, and the traceback goes only to the log under that id. No
exception ever takes the process down.

Use `@handles_errors` on every (async, grpc.aio) servicer method, unary or with a
response stream; ModelStreamInfer, which answers errors in-stream, uses `status_for`
directly. The decorator also counts each call against the servicer's CallLimits
(serve/frontend/limits.py): past them the call gets RESOURCE_EXHAUSTED at once.
Observing requests for the statistics is not done here: serve/frontend/observe.py
wraps the calls from outside and reads the status this map decided.
"""
from __future__ import annotations

import functools
import inspect
import logging
import uuid

import grpc

from rnnserve.serve.errors import ServeError
from rnnserve.serve.frontend.limits import STREAMING_METHODS, limits_of

logger = logging.getLogger(__name__)


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


def release(exc: BaseException) -> None:
    """Drop what a handled exception holds: its traceback's frames hold the request and its
    decoded tensors, and grpc.aio keeps the last call's error until the next call arrives, so
    a refused 100 MB request would otherwise stay in memory that long. Call after status_for
    (which logs the traceback of an unexpected error)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


# -- the decorator -------------------------------------------------------------------------------
def handles_errors(func):
    """Decorate an async servicer method (a coroutine, or an async generator for a response
    stream): exceptions -> a gRPC status, never a crash. The call counts against the
    servicer's CallLimits (serve/frontend/limits.py): past them, RESOURCE_EXHAUSTED at once."""
    method = func.__qualname__
    streaming = func.__name__ in STREAMING_METHODS
    if inspect.isasyncgenfunction(func):
        @functools.wraps(func)
        async def stream_wrapper(self, request, context):
            limits = limits_of(self)
            try:
                limits.enter(streaming)
                try:
                    answers = func(self, request, context)
                    try:
                        async for answer in answers:
                            yield answer
                    finally:   # the servicer's clean-up runs now, also when the call is cancelled
                        await answers.aclose()
                finally:
                    limits.leave(streaming)
            except Exception as exc:  # noqa: BLE001 - the one catch-all, by design
                if context.cancelled():   # client gone: nobody to answer
                    logger.debug("%s: client went away (%s)", method, exc.__class__.__name__)
                    release(exc)
                    return
                code, message = status_for(exc, method)
                release(exc)
            else:
                return
            # Aborted outside the except block, with the request dropped: the abort's exception
            # then carries neither the error (as its __context__) nor a frame that holds the request.
            request = None
            await context.abort(code, message)
        return stream_wrapper

    @functools.wraps(func)
    async def unary_wrapper(self, request, context):
        limits = limits_of(self)
        try:
            limits.enter(streaming)
            try:
                return await func(self, request, context)
            finally:
                limits.leave(streaming)
        except Exception as exc:  # noqa: BLE001 - the one catch-all, by design
            code, message = status_for(exc, method)
            release(exc)
        request = None   # as in stream_wrapper
        await context.abort(code, message)   # raises; grpc answers the call with this status
    return unary_wrapper
