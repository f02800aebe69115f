"""Thin gRPC servicers over the data plane.

Each method converts the request with serve.convert, calls one DataPlane method,
and converts the answer back. Errors become status codes in serve.grpc_errors
(`@handles_errors`); ModelStreamInfer answers them in-stream as error_message,
as Triton does, and the stream goes on.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import grpc

from . import convert
from .grpc_errors import handles_errors, status_for
from .gen import grpc_service_pb2 as pb
from .gen import grpc_service_pb2_grpc as pb_grpc
from .gen import text_service_pb2_grpc as tpb_grpc

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 3   # PredictRequest.top_k == 0


def _infer_request(request: pb.ModelInferRequest, context: grpc.ServicerContext):
    return convert.infer_request_from_proto(request, context.time_remaining(),
                                            lambda: not context.is_active())


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService: the Open Inference Protocol, Triton's dialect."""

    def __init__(self, dataplane, on_repository_change: Optional[Callable[[], None]] = None):
        self._dp = dataplane
        self._on_repository_change = on_repository_change or (lambda: None)

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
        for request in request_iterator:
            try:
                response = convert.infer_response_to_proto(
                    self._dp.infer(_infer_request(request, context)))
            except Exception as exc:  # noqa: BLE001 - answered in-stream; the stream goes on
                _, message = status_for(exc, "ModelStreamInfer")
                yield pb.ModelStreamInferResponse(error_message=message)
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    @handles_errors
    def RepositoryIndex(self, request, context):
        return convert.repository_index_to_proto(self._dp.repository_index(), request.ready)

    @handles_errors
    def RepositoryModelLoad(self, request, context):
        try:
            self._dp.load_model(request.model_name)
        finally:
            self._on_repository_change()
        return pb.RepositoryModelLoadResponse()

    @handles_errors
    def RepositoryModelUnload(self, request, context):
        try:
            self._dp.unload_model(request.model_name)
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
