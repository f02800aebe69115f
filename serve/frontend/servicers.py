"""Thin grpc.aio servicers over the data plane.

Every method is a coroutine on the server's one event loop. Each converts the request
with serve/wire/convert.py (tensors) or serve/wire/messages.py (the rest), calls one
DataPlane (inference, metadata) or RepositoryAdmin (load, unload, index) method, and
converts the answer back. Errors
become status codes in serve.frontend.grpc_errors (`@handles_errors`); ModelStreamInfer
answers them in-stream as error_message, as Triton does, and the stream goes on.

Nothing here blocks the loop for long: tensor requests are validated and queued on the loop
(DataPlane.submit, quick) and their outputs awaited through the LoopBridge while the
Batcher's threads run onnxruntime, except a batch estimated to take at most --inline-run-us,
which runs on the loop when the Coalescer releases it (Batcher.release(here=True)). The text
API and repository changes, which wait on model runs or loads inside the data plane, run on a
small thread pool (`blocking`); a stream waiting for its next message holds no thread at all.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future

from rnnserve.serve.errors import quoted
from rnnserve.serve.frontend import decoding
from rnnserve.serve.frontend.bridge import Coalescer, LoopBridge, outcome, outputs
from rnnserve.serve.frontend.grpc_errors import handles_errors, release, status_for
from rnnserve.serve.wire import convert, messages
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 3   # PredictRequest.top_k == 0


class _Call:
    """Whether the RPC has ended (client cancelled, deadline, server stop): a plain flag the
    Batcher's threads may read (InferRequest.is_cancelled) without touching grpc."""

    __slots__ = ("ended",)

    def __init__(self, context):
        self.ended = False
        context.add_done_callback(self._done)

    def _done(self, _context) -> None:
        self.ended = True

    def is_cancelled(self) -> bool:
        return self.ended


def _infer_request(request: pb.ModelInferRequest, context, call: _Call):
    return convert.infer_request_from_proto(request, context.time_remaining(), call.is_cancelled)


def _submit(dp, coalesce: Coalescer, req):
    """DataPlane.submit, with the model's batcher held until the loop releases it (Coalescer)."""
    return dp.submit(req, hold=coalesce.hold)


class _Blocking:
    """Runs data-plane calls that wait (text API, repository changes) off the loop."""

    def __init__(self, executor: Executor):
        self._executor = executor

    async def __call__(self, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs))


def _stream_error(request: pb.ModelInferRequest, exc: BaseException) -> pb.ModelStreamInferResponse:
    _, message = status_for(exc, "ModelStreamInfer")
    if request.id:
        message = f"request {quoted(request.id)}: {message}"
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                             model_version=request.model_version,
                                             id=request.id))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService: the Open Inference Protocol, Triton's dialect."""

    def __init__(self, dataplane, admin, bridge: LoopBridge, blocking: Executor,
                 on_repository_change: Callable[[], None] | None = None, observe_stream_request=None):
        """observe_stream_request: RequestObservation.stream_request (serve/frontend/observe.py), or None."""
        self._dp = dataplane
        self._admin = admin
        self._bridge = bridge
        self._coalesce = Coalescer(asyncio.get_running_loop())
        self._observe_stream_request = observe_stream_request
        self._blocking = _Blocking(blocking)
        self._on_repository_change = on_repository_change or (lambda: None)

    @handles_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self._dp.server_live())

    @handles_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._dp.server_ready())

    @handles_errors
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._dp.model_ready(request.name, request.version))

    @handles_errors
    async def ServerMetadata(self, request, context):
        return messages.server_metadata_to_proto(self._dp.server_metadata())

    @handles_errors
    async def ModelMetadata(self, request, context):
        return messages.model_metadata_to_proto(
            self._dp.model_metadata(request.name, request.version))

    @handles_errors
    async def ModelConfig(self, request, context):
        return messages.model_config_to_proto(self._dp.model_config(request.name, request.version))

    @handles_errors
    async def ModelStatistics(self, request, context):
        return messages.model_stats_to_proto(
            self._dp.model_statistics(request.name, request.version))

    @handles_errors
    async def ModelInfer(self, request, context):
        pending = _submit(self._dp, self._coalesce, _infer_request(request, context, _Call(context)))
        out = await outputs(self._bridge, pending.raw, pending.cancel, pending.deadline)
        return convert.infer_response_to_proto(pending.respond(out))

    @handles_errors
    async def ModelStreamInfer(self, requests, context):
        """Pipelined: a reader task submits each request the moment it arrives (DataPlane.submit,
        in arrival order, so one sequence's steps keep their order and different sequences' steps
        share runs), without waiting for earlier answers; answers go out in request order (Triton,
        non-decoupled), each as soon as it and the ones before it are done. An error is answered
        in-stream (error_message, plus the request's id in infer_response) and the stream goes on.
        Each request's outcome is recorded with observe_stream_request (serve/frontend/observe.py).
        Per step this makes no asyncio future of its own: the answer loop waits (on the LoopBridge)
        only for an answer that is not done when its turn comes, and for the reader when it has
        caught up with it."""
        dp, bridge, coalesce, observe = self._dp, self._bridge, self._coalesce, self._observe_stream_request
        loop = asyncio.get_running_loop()
        call = _Call(context)
        arrived: collections.deque = collections.deque()   # (request, Pending or its error, t0), in order
        more: list[asyncio.Future | None] = [None]          # the answer loop waits here for the reader
        reading = True

        def wake() -> None:
            if more[0] is not None and not more[0].done():
                more[0].set_result(None)

        async def read() -> None:
            nonlocal reading
            try:
                async for request in requests:
                    t0 = time.perf_counter()
                    try:
                        arrived.append((request, _submit(dp, coalesce, _infer_request(decoding.check(request),
                                                                                       context, call)), t0))
                    except Exception as exc:  # noqa: BLE001 - a bad request is answered in-stream
                        arrived.append((pb.ModelInferRequest() if isinstance(request, decoding.Undecodable)
                                        else request, exc, t0))
                    request = None   # the deque holds it; nothing here while idle
                    wake()
            except Exception as exc:  # noqa: BLE001 - the call ended under the reader (cancel, stop)
                logger.debug("ModelStreamInfer: reading ended: %s", exc.__class__.__name__)
            finally:
                reading = False
                wake()

        reader = asyncio.ensure_future(read())
        try:
            while arrived or reading:
                if not arrived:
                    more[0] = waiting = loop.create_future()
                    await waiting
                    more[0] = None
                    continue
                request, pending, t0 = arrived.popleft()
                try:
                    if isinstance(pending, Exception):
                        raise pending
                    raw = pending.raw
                    out = outcome(raw) if raw.done() else await bridge.wrap(raw)
                    answer = pb.ModelStreamInferResponse()
                    convert.infer_response_to_proto(pending.respond(out), answer.infer_response)
                    failure = None
                except Exception as exc:  # noqa: BLE001 - answered in-stream; the stream goes on
                    answer, failure = _stream_error(request, exc), exc
                    release(exc)
                if observe is not None:
                    observe(request, failure, answer.infer_response, t0)
                yield answer
                # Nothing of this request stays referenced while the stream waits for the next one.
                request = pending = raw = out = answer = failure = None
        finally:
            reader.cancel()
            arrived.clear()

    @handles_errors
    async def RepositoryIndex(self, request, context):
        return messages.repository_index_to_proto(self._admin.repository_index(), request.ready)

    @handles_errors
    async def RepositoryModelLoad(self, request, context):
        try:
            await self._blocking(self._admin.load_model, request.model_name)
        finally:
            self._on_repository_change()
        return pb.RepositoryModelLoadResponse()

    @handles_errors
    async def RepositoryModelUnload(self, request, context):
        try:
            await self._blocking(self._admin.unload_model, request.model_name)
        finally:
            self._on_repository_change()
        return pb.RepositoryModelUnloadResponse()


class _OffLoop:
    """Work on the pool for one stream (generate steps, text chunks) and its closing: close()
    runs at once on the loop when no job is running (it is quick), else on the pool after that
    job (a cancelled call's job keeps running until it returns), never blocking the loop."""

    def __init__(self, pool: Executor, close: Callable[[], None]):
        self._pool, self._close = pool, close
        self._lock = threading.Lock()
        self._job: Future | None = None

    async def run(self, fn: Callable, *args):
        self._job = self._pool.submit(self._locked, fn, *args)
        return await asyncio.wrap_future(self._job)

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    def close(self) -> None:
        if self._job is not None and not self._job.done():
            self._pool.submit(self._locked, self._close)
        else:
            self._close()


class TextServicer(tpb_grpc.TextServiceServicer):
    """rnnserve.v1.TextService: text in, text out."""

    def __init__(self, dataplane, blocking: Executor):
        self._dp = dataplane
        self._pool = blocking
        self._blocking = _Blocking(blocking)

    @handles_errors
    async def Predict(self, request, context):
        result = await self._blocking(self._dp.predict_text, request.model, request.text,
                                      top_k=request.top_k or DEFAULT_TOP_K, version=request.version)
        return messages.predict_to_proto(result)

    @handles_errors
    async def Generate(self, request, context):
        events = await self._blocking(self._dp.generate, **messages.generate_args_from_proto(request))
        steps = _OffLoop(self._pool, events.close)
        try:
            while (event := await steps.run(next, events, None)) is not None:
                yield messages.generate_event_to_proto(event)   # waits while the client does not read
        finally:
            steps.close()

    @handles_errors
    async def Score(self, request, context):
        return messages.score_to_proto(await self._blocking(self._dp.score, request.model, request.text,
                                                           version=request.version))

    @handles_errors
    async def Stream(self, request_iterator, context):
        """Text chunks in, each chunk's predictions out; the state stays in a DataPlane TextStream.
        The first message opens it (model/version/top_k); every message with text is answered."""
        first, stream, chunk = None, None, 0
        try:
            async for request in request_iterator:
                request = decoding.check(request)
                if stream is None:
                    first = request
                    stream = self._dp.open_text_stream(**messages.stream_open_args(request, DEFAULT_TOP_K))
                    chunks = _OffLoop(self._pool, stream.close)
                    if not request.text:
                        continue
                else:
                    messages.check_stream_followup(request, first)
                result = await chunks.run(stream.feed, request.text)
                yield messages.stream_response_to_proto(result, chunk)
                chunk += 1
        finally:
            if stream is not None:
                chunks.close()
