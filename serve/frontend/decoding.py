"""Request bodies that protobuf cannot parse get INVALID_ARGUMENT, never INTERNAL.

grpc's generated registration decodes with `FromString` and answers a failure with INTERNAL
("Exception deserializing request!"). `method_handlers` registers a servicer with a tolerant
deserializer instead: a body that does not parse becomes an `Undecodable`, which unary calls
refuse here (INVALID_ARGUMENT, `await context.abort`) before the grpc.aio servicer runs; a
servicer that reads a request stream checks each message with `check` (ModelStreamInfer answers it in-stream).
"""
from __future__ import annotations

import functools

import grpc
from google.protobuf import message_factory

from rnnserve.serve.errors import InvalidArgument


class Undecodable:
    """Stands in for a request body that is not a valid message of its type."""

    def __init__(self, type_name: str, reason: str):
        self.type_name, self.reason = type_name, reason

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid {self.type_name} message: {self.reason[:200]}")


def tolerant(message_class):
    """A request deserializer that returns an Undecodable instead of raising."""
    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything the parser raises
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)
    return deserialize


def check(request):
    """The request itself, or InvalidArgument if its body did not decode."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


def _refuse_undecodable(behavior, streaming_response: bool):
    """Wrap a grpc.aio method (a coroutine, or an async generator for a response stream)."""
    if streaming_response:
        @functools.wraps(behavior)
        async def stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
            answers, request = behavior(request, context), None   # see unary
            async for answer in answers:
                yield answer
        return stream

    @functools.wraps(behavior)
    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
        # This frame lets the request go: a refused call's exception holds the frame until
        # grpc.aio's next call (serve/frontend/grpc_errors.release).
        answer, request = behavior(request, context), None
        return await answer
    return unary


HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer, service) -> dict[str, grpc.RpcMethodHandler]:
    """{method name: handler} for every method of `service` (a ServiceDescriptor) on `servicer`."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        if not method.client_streaming:
            behavior = _refuse_undecodable(behavior, method.server_streaming)
        make = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(behavior, request_deserializer=tolerant(request_class),
                                     response_serializer=response_class.SerializeToString)
    return handlers


def add_servicer(server, servicer, service, wrap=None) -> None:
    """Register the grpc.aio `servicer` for `service` on a grpc.aio server with tolerant decoding.
    wrap(service name, {method: handler}) -> the handlers to register (request observation)."""
    handlers = method_handlers(servicer, service)
    if wrap is not None:
        handlers = wrap(service.full_name, handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service.full_name, handlers)
