"""Thin gRPC servicers over the data plane.

Each method converts the request with serve/wire/convert.py, calls one DataPlane
(inference, metadata) or RepositoryAdmin (load, unload, index) method, and converts
the answer back. Errors become status codes in serve.grpc_errors
(`@handles_errors`); ModelStreamInfer answers them in-stream as error_message,
as Triton does, and the stream goes on.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from rnnserve.serve.errors import quoted
from rnnserve.serve.frontend import decoding
from rnnserve.serve.frontend.grpc_errors import handles_errors, status_for
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 3   # PredictRequest.top_k == 0


def _infer_request(request: pb.ModelInferRequest, context: grpc.ServicerContext):
    return convert.infer_request_from_proto(request, context.time_remaining(),
                                            lambda: not context.is_active())


def _failed(exc: BaseException) -> Future:
    fut: Future = Future()
    fut.set_exception(exc)
    return fut


class _PipelinedStream:
    """One ModelStreamInfer call. A reader thread submits each request the moment it arrives
    (DataPlane.infer_async, in arrival order, so one sequence's steps keep their order and
    different sequences' steps share runs); the handler thread answers in request order, as
    Triton does for non-decoupled models, each answer as soon as it and those before it are done."""

    _READ_DONE = object()   # the client half-closed (or the read failed)
    _CALL_DONE = object()   # the RPC ended (client cancelled, deadline, server stop)
    POLL_S = 0.5

    def __init__(self, dataplane, request_iterator, context: grpc.ServicerContext, observe=None):
        self._dp, self._requests, self._context = dataplane, request_iterator, context
        # each streamed request's outcome: observe(request, exception or None, answer, t0) (observe.py)
        self._observe = observe
        self._submitted: queue.Queue = queue.Queue()
        self._ended = threading.Event()
        context.add_callback(self._on_call_done)

    def _on_call_done(self) -> None:
        self._ended.set()
        self._submitted.put(self._CALL_DONE)

    def _read(self) -> None:
        try:
            for request in self._requests:
                t0 = time.perf_counter()
                try:
                    fut = self._dp.infer_async(_infer_request(decoding.check(request), self._context))
                except Exception as exc:  # noqa: BLE001 - a bad request is answered in-stream
                    fut = _failed(exc)
                    if isinstance(request, decoding.Undecodable):
                        request = pb.ModelInferRequest()
                self._submitted.put((request, fut, t0))
        except Exception as exc:  # noqa: BLE001 - the call ended under the reader (cancel, stop)
            logger.debug("ModelStreamInfer: reading ended: %s", exc.__class__.__name__)
        finally:
            self._submitted.put(self._READ_DONE)

    def _wait(self, fut: Future) -> bool:
        """True once fut is done; False if the call ended first."""
        while not self._ended.is_set():
            try:
                fut.exception(timeout=self.POLL_S)   # waits on the future itself: no waiter objects
                return True
            except FutureTimeout:
                continue
            except CancelledError:
                return True
        return False

    def responses(self):
        threading.Thread(target=self._read, name="rnnserve-stream-reader", daemon=True).start()
        while True:
            item = self._submitted.get()
            if item is self._READ_DONE or item is self._CALL_DONE:
                return
            request, fut, t0 = item
            if not self._wait(fut):
                return
            answer = _stream_answer(request, fut)
            if self._observe is not None:
                self._observe(request, fut.exception(), answer.infer_response, t0)
            yield answer


def _stream_answer(request: pb.ModelInferRequest, fut: Future) -> pb.ModelStreamInferResponse:
    exc = fut.exception()
    if exc is None:
        return pb.ModelStreamInferResponse(
            infer_response=convert.infer_response_to_proto(fut.result()))
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

    def __init__(self, dataplane, admin, on_repository_change: Callable[[], None] | None = None,
                 observe_stream_request=None):
        """observe_stream_request: RequestObservation.stream_request (serve/frontend/observe.py), or None."""
        self._dp = dataplane
        self._admin = admin
        self._on_repository_change = on_repository_change or (lambda: None)
        self._observe_stream_request = observe_stream_request

    @handles_errors
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self._dp.server_live())

    @handles_errors
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._dp.server_ready())

    @handles_errors
    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._dp.model_ready(request.name, request.version))

    @handles_errors
    def ServerMetadata(self, request, context):
        return convert.server_metadata_to_proto(self._dp.server_metadata())

    @handles_errors
    def ModelMetadata(self, request, context):
        return convert.model_metadata_to_proto(
            self._dp.model_metadata(request.name, request.version))

    @handles_errors
    def ModelConfig(self, request, context):
        return convert.model_config_to_proto(self._dp.model_config(request.name, request.version))

    @handles_errors
    def ModelStatistics(self, request, context):
        return convert.model_stats_to_proto(
            self._dp.model_statistics(request.name, request.version))

    @handles_errors
    def ModelInfer(self, request, context):
        return convert.infer_response_to_proto(self._dp.infer(_infer_request(request, context)))

    @handles_errors
    def ModelStreamInfer(self, request_iterator, context):
        """Pipelined: each request is queued (DataPlane.infer_async) the moment it arrives, in
        arrival order, without waiting for earlier answers; answers go out in request
        order (Triton, non-decoupled), each as soon as it and the ones before it are done.
        An error is answered in-stream (error_message, plus the request's id in infer_response)
        and the stream goes on."""
        yield from _PipelinedStream(self._dp, request_iterator, context, self._observe_stream_request).responses()

    @handles_errors
    def RepositoryIndex(self, request, context):
        return convert.repository_index_to_proto(self._admin.repository_index(), request.ready)

    @handles_errors
    def RepositoryModelLoad(self, request, context):
        try:
            self._admin.load_model(request.model_name)
        finally:
            self._on_repository_change()
        return pb.RepositoryModelLoadResponse()

    @handles_errors
    def RepositoryModelUnload(self, request, context):
        try:
            self._admin.unload_model(request.model_name)
        finally:
            self._on_repository_change()
        return pb.RepositoryModelUnloadResponse()


class TextServicer(tpb_grpc.TextServiceServicer):
    """rnnserve.v1.TextService: text in, text out."""

    def __init__(self, dataplane):
        self._dp = dataplane

    @handles_errors
    def Predict(self, request, context):
        result = self._dp.predict_text(request.model, request.text,
                                       top_k=request.top_k or DEFAULT_TOP_K,
                                       version=request.version)
        return convert.predict_to_proto(result)

    @handles_errors
    def Generate(self, request, context):
        for event in self._dp.generate(**convert.generate_args_from_proto(request)):
            if not context.is_active():
                logger.debug("Generate: client went away after %d tokens", event.index)
                return
            yield convert.generate_event_to_proto(event)

    @handles_errors
    def Score(self, request, context):
        return convert.score_to_proto(self._dp.score(request.model, request.text,
                                                     version=request.version))

    @handles_errors
    def Stream(self, request_iterator, context):
        """Text chunks in, each chunk's predictions out; the state stays in a DataPlane TextStream.
        The first message opens it (model/version/top_k); every message with text is answered."""
        first, stream, chunk = None, None, 0
        try:
            for request in map(decoding.check, request_iterator):
                if stream is None:
                    first = request
                    stream = self._dp.open_text_stream(
                        **convert.stream_open_args(request, DEFAULT_TOP_K))
                    if not request.text:
                        continue
                else:
                    convert.check_stream_followup(request, first)
                yield convert.stream_response_to_proto(stream.feed(request.text), chunk)
                chunk += 1
        finally:
            if stream is not None:
                stream.close()
