"""Request observation: one serve.stats.RequestRecord per answered inference request.

`RequestObservation.handlers` wraps the method handlers of the inference calls when they
are registered (serve/frontend/decoding.py add_servicer), outside the error map
(serve/frontend/grpc_errors.py) and outside the refusal of undecodable bodies, and reads
the status code the call ended with, so it sees exactly what the client got: OK, a
serve.errors code, INTERNAL, or CANCELLED when the client went away. (Wrapping at
registration, not as a server interceptor, keeps grpc.aio from running an interceptor
chain for every call.) A call that auth refuses never reaches its handler and is not
recorded. ModelStreamInfer answers each streamed request in-stream, so its servicer
reports every one with `stream_request`.

The records go to one function (DataPlane.record_request), which feeds the
Prometheus request series and ModelStatistics' success / fail counts together.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from rnnserve.serve.frontend.grpc_errors import code_for
from rnnserve.serve.stats import RequestRecord
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import text_service_pb2 as tpb

log = logging.getLogger(__name__)

Record = Callable[[RequestRecord], None]


def _full_names(service, names: Iterable[str]) -> dict[str, str]:
    return {f"/{service.full_name}/{n}": n for n in names if n in service.methods_by_name}


# Calls that are one inference request each: "/package.Service/Method" -> method label.
OBSERVED = (_full_names(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], ["ModelInfer"])
            | _full_names(tpb.DESCRIPTOR.services_by_name["TextService"],
                          ["Predict", "Generate", "Score", "Stream"]))
STREAM_METHOD = "ModelStreamInfer"


# message type -> (its model field, its version field): model_name / model, model_version / version
_FIELDS: dict[type, tuple[str | None, str | None]] = {}


def _fields(message: Any) -> tuple[str | None, str | None]:
    kind = type(message)
    found = _FIELDS.get(kind)
    if found is None:
        fields = getattr(getattr(message, "DESCRIPTOR", None), "fields_by_name", {})
        found = _FIELDS[kind] = (next((n for n in ("model_name", "model") if n in fields), None),
                                 next((n for n in ("model_version", "version") if n in fields), None))
    return found


def _model_of(message: Any) -> tuple[str, str]:
    """(model, version) a request or answer names; "" where it has no such field."""
    model, version = _fields(message)
    return (getattr(message, model) if model else "", getattr(message, version) if version else "")


def _status(context, raised: BaseException | None) -> str:
    """The status the call ends with: what the error map set, else CANCELLED if the client is gone
    (grpc.aio then cancels the call's task, or closes its response stream)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if context.cancelled() or isinstance(raised, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"   # the call went away: its task was cancelled or its stream closed under us
    return "UNKNOWN" if raised is not None else "OK"


class RequestObservation:
    """The handler wrappers, plus `stream_request` for the requests of ModelStreamInfer."""

    def __init__(self, record: Record):
        self._record = record

    def report(self, method: str, request: Any, answer: Any, code: str, t0: float) -> None:
        """Record one request's outcome (t0: time.perf_counter() at its arrival). The version is the
        one the answer names, else the one the request named. Never raises."""
        try:
            model, asked = _model_of(request)
            version = (_model_of(answer)[1] if answer is not None else "") or asked
            self._record(RequestRecord(method, model, version, code, time.perf_counter() - t0))
        except Exception:  # noqa: BLE001 - statistics must never break serving
            log.exception("recording a request failed")

    def stream_request(self, request: Any, exc: BaseException | None, answer: Any, t0: float) -> None:
        """One request of a ModelStreamInfer call, answered in-stream (exc None = OK)."""
        self.report(STREAM_METHOD, request, answer, code_for(exc).name, t0)

    # -- the handlers -------------------------------------------------------------------------
    def handlers(self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]
                 ) -> dict[str, grpc.RpcMethodHandler]:
        """{method: handler} of one service, the observed methods' handlers wrapped."""
        out = dict(handlers)
        for name, handler in handlers.items():
            method = OBSERVED.get(f"/{service_name}/{name}")
            if method is not None:
                out[name] = self._wrap(method, handler)
        return out

    def _wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        codec = {"request_deserializer": h.request_deserializer, "response_serializer": h.response_serializer}
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, h.unary_unary), **codec)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._streaming(method, h.unary_stream, False), **codec)
        if h.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._streaming(method, h.stream_stream, True), **codec)
        return h

    def _unary(self, method: str, behavior):
        async def call(request, context):
            t0, answer, raised = time.perf_counter(), None, None
            try:
                answer = await behavior(request, context)
                return answer
            except BaseException as exc:
                raised = exc
                raise
            finally:
                self.report(method, request, answer, _status(context, raised), t0)
                # A refused call's exception, which grpc.aio keeps until the next call, holds
                # this frame: it must not hold the request (serve/frontend/grpc_errors.release).
                request = answer = raised = None
        return call

    def _streaming(self, method: str, behavior, request_stream: bool):
        async def call(request, context):
            t0, seen, raised = time.perf_counter(), _Seen(None if request_stream else request), None
            answers = behavior(seen.requests(request) if request_stream else request, context)
            try:
                async for answer in answers:
                    seen.answer = answer
                    yield answer
            except BaseException as exc:   # also when the call is cancelled under us: CANCELLED
                raised = exc
                raise
            finally:
                await answers.aclose()
                self.report(method, seen.request, seen.answer, _status(context, raised), t0)
                request = raised = None   # as in _unary
                del seen
        return call


class _Seen:
    """The request (the first message of a request stream) and the last answer of one call."""

    def __init__(self, request: Any):
        self.request = request
        self.answer = None

    async def requests(self, iterator):
        async for message in iterator:
            if self.request is None:
                self.request = message
            yield message
