"""The one module converting between protobuf messages and serve.types / numpy.

Tensors travel little-endian, row-major and unpadded. Requests may carry them in
`raw_input_contents` (one blob per input, in input order; what tritonclient
sends) or in each input's typed `contents`; responses always use
`raw_output_contents`, the only place tritonclient reads. Everything a client
can get wrong here raises serve.errors.InvalidArgument with a message that says
what is wrong.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from rnnserve.serve.errors import InvalidArgument, quoted
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import model_config_pb2 as mc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.types import (
    GenerateEvent,
    InferRequest,
    InferResponse,
    ModelConfigInfo,
    ModelMetadata,
    ModelStats,
    ParamValue,
    PredictResult,
    RepositoryEntry,
    ScoreResult,
    ServerMetadata,
    TensorSpec,
)

# Open Inference Protocol datatype -> numpy dtype (little-endian on the wire).
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code).newbyteorder("<") for name, code in {
        "BOOL": "?", "UINT8": "u1", "UINT16": "u2", "UINT32": "u4", "UINT64": "u8",
        "INT8": "i1", "INT16": "i2", "INT32": "i4", "INT64": "i8",
        "FP16": "f2", "FP32": "f4", "FP64": "f8"}.items()}
DATATYPES = tuple(NUMPY_DTYPES) + ("BYTES", "BF16")   # every name the protocol knows
_DATATYPE_OF = {dt.newbyteorder("="): name for name, dt in NUMPY_DTYPES.items()}

# Which InferTensorContents field carries each datatype (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents"}

MAX_RANK = 16         # no tensor of ours comes near it; numpy stops at 64
NO_DEADLINE_S = 1e8   # grpc reports a huge time_remaining() when the client set none


# ---- parameters -------------------------------------------------------------

def param_value(name: str, param) -> ParamValue:
    """InferParameter / ModelRepositoryParameter -> bool, int, float, str or bytes."""
    choice = param.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidArgument(f"parameter {quoted(name)} has no value")
    return getattr(param, choice)


def params_from_proto(params) -> dict[str, ParamValue]:
    return {key: param_value(key, param) for key, param in params.items()}


def params_to_proto(values: dict[str, ParamValue], target) -> None:
    for key, value in values.items():
        param = target[key]
        if isinstance(value, (bool, np.bool_)):
            param.bool_param = bool(value)
        elif isinstance(value, (int, np.integer)):
            if int(value) > np.iinfo(np.int64).max:
                param.uint64_param = int(value)
            else:
                param.int64_param = int(value)
        elif isinstance(value, (float, np.floating)):
            param.double_param = float(value)
        else:
            param.string_param = str(value)


# ---- tensors ----------------------------------------------------------------

def _dtype_for(tensor_name: str, datatype: str) -> np.dtype:
    if datatype in NUMPY_DTYPES:
        return NUMPY_DTYPES[datatype]
    if datatype in DATATYPES:
        raise InvalidArgument(f"input {quoted(tensor_name)}: datatype {datatype} is not supported")
    raise InvalidArgument(f"input {quoted(tensor_name)}: unknown datatype {quoted(datatype)}; "
                          f"expected one of {', '.join(DATATYPES)}")


def _shape_of(tensor_name: str, dims) -> tuple:
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"input {quoted(tensor_name)}: shape has {len(dims)} dimensions, "
                              f"over the limit of {MAX_RANK}")
    shape = tuple(int(d) for d in dims)
    negative = [d for d in shape if d < 0]
    if negative:
        raise InvalidArgument(f"input {quoted(tensor_name)}: shape {list(shape)} has a negative "
                              f"dimension {negative[0]}")
    return shape


def _bytes_from_raw(name: str, shape: tuple, raw: bytes) -> np.ndarray:
    """BYTES: each element is a 4-byte little-endian length and that many bytes (Triton's layout)."""
    count, at = math.prod(shape), 0
    items: list[bytes] = []
    while at < len(raw) and len(items) < count:
        if at + 4 > len(raw):
            break
        size = int.from_bytes(raw[at:at + 4], "little")
        if at + 4 + size > len(raw):
            break
        items.append(bytes(raw[at + 4:at + 4 + size]))
        at += 4 + size
    if len(items) != count or at != len(raw):
        raise InvalidArgument(f"input {quoted(name)}: raw_input_contents is not {count} length-prefixed BYTES "
                              f"elements for shape {list(shape)}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return _reshape(name, array, shape)


def _reshape(name: str, flat: np.ndarray, shape: tuple) -> np.ndarray:
    """numpy refuses some shapes whose element count is right (a zero-size array with a dimension
    past its index range, more than 64 dimensions): the client's mistake, not ours."""
    try:
        return flat.reshape(shape)
    except ValueError as exc:
        raise InvalidArgument(f"input {quoted(name)}: shape {list(shape)} cannot be made: {exc}") from None


def tensor_from_raw(name: str, datatype: str, dims, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_from_raw(name, _shape_of(name, dims), raw)
    dtype = _dtype_for(name, datatype)
    shape = _shape_of(name, dims)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(f"input {quoted(name)}: shape {list(shape)} of {datatype} needs {expected} "
                              f"bytes of raw_input_contents, got {len(raw)}")
    return _reshape(name, np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False), shape)


def tensor_from_contents(name: str, datatype: str, dims, contents) -> np.ndarray:
    shape = _shape_of(name, dims)
    if datatype == "BYTES":
        if len(contents.bytes_contents) != math.prod(shape):
            raise InvalidArgument(f"input {quoted(name)}: shape {list(shape)} has {math.prod(shape)} elements, "
                                  f"bytes_contents has {len(contents.bytes_contents)}")
        array = np.empty(len(contents.bytes_contents), dtype=object)
        array[:] = list(contents.bytes_contents)
        return _reshape(name, array, shape)
    dtype = _dtype_for(name, datatype)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"input {quoted(name)}: {datatype} has no typed contents field; "
                              f"send it in raw_input_contents")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(f"input {quoted(name)}: shape {list(shape)} has {count} elements, "
                              f"{field} has {len(values)}")
    try:
        flat = np.array(values, dtype=dtype.newbyteorder("="))
    except (OverflowError, ValueError) as exc:
        raise InvalidArgument(f"input {quoted(name)}: {field} value out of range for {datatype}: {exc}") from None
    return _reshape(name, flat, shape)


def tensor_to_raw(array: np.ndarray) -> tuple[str, bytes]:
    """-> (datatype, little-endian row-major bytes)."""
    native = array.dtype.newbyteorder("=")
    datatype = _DATATYPE_OF.get(native)
    if datatype is None:
        raise TypeError(f"no protocol datatype for numpy dtype {array.dtype}")
    return datatype, np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


# ---- inference --------------------------------------------------------------

def deadline_from(time_remaining: float | None) -> float | None:
    """time.monotonic() by which the call must start running, from grpc's time_remaining()."""
    if time_remaining is None or time_remaining >= NO_DEADLINE_S:
        return None
    return time.monotonic() + max(time_remaining, 0.0)


def infer_request_from_proto(msg: pb.ModelInferRequest, time_remaining: float | None = None,
                             is_cancelled: Callable[[], bool] | None = None) -> InferRequest:
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(msg.inputs)} inputs; "
                              f"send one per input, in input order")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(msg.inputs):
        if tensor.name in inputs:
            raise InvalidArgument(f"input {quoted(tensor.name)} is given twice")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input {quoted(tensor.name)}: contents must be empty when "
                                      f"raw_input_contents is used")
            array = tensor_from_raw(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            array = tensor_from_contents(tensor.name, tensor.datatype, tensor.shape,
                                         tensor.contents)
        inputs[tensor.name] = array
        datatypes[tensor.name] = tensor.datatype
    requested = [out.name for out in msg.outputs] or None
    return InferRequest(model_name=msg.model_name, model_version=msg.model_version, id=msg.id,
                        inputs=inputs, input_datatypes=datatypes, requested_outputs=requested,
                        parameters=params_from_proto(msg.parameters),
                        deadline=deadline_from(time_remaining), is_cancelled=is_cancelled)


def infer_response_to_proto(resp: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version,
                                id=resp.id)
    params_to_proto(resp.parameters, msg.parameters)
    for name, array in resp.outputs:
        datatype, blob = tensor_to_raw(array)
        msg.outputs.add(name=name, datatype=datatype, shape=array.shape)
        msg.raw_output_contents.append(blob)
    return msg


def infer_request_to_proto(model: str, inputs: dict[str, np.ndarray], version: str = "",
                           outputs: list[str] | None = None, request_id: str = "",
                           parameters: dict[str, ParamValue] | None = None
                           ) -> pb.ModelInferRequest:
    """The client side: numpy inputs -> a request with raw_input_contents."""
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        datatype, blob = tensor_to_raw(np.asarray(array))
        msg.inputs.add(name=name, datatype=datatype, shape=np.shape(array))
        msg.raw_input_contents.append(blob)
    for name in outputs or ():
        msg.outputs.add(name=name)
    params_to_proto(parameters or {}, msg.parameters)
    return msg


def infer_outputs_from_proto(msg: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The client side: a response's outputs (raw or typed contents) -> numpy arrays."""
    raw = msg.raw_output_contents
    if raw:
        return {out.name: tensor_from_raw(out.name, out.datatype, out.shape, raw[i])
                for i, out in enumerate(msg.outputs)}
    return {out.name: tensor_from_contents(out.name, out.datatype, out.shape, out.contents)
            for out in msg.outputs}


# ---- metadata, config, statistics, repository ------------------------------

def server_metadata_to_proto(meta: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=meta.name, version=meta.version,
                                     extensions=meta.extensions)


def _tensor_metadata(spec: TensorSpec):
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype,
                                                   shape=spec.shape)


def model_metadata_to_proto(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(name=meta.name, versions=meta.versions,
                                    platform=meta.platform,
                                    inputs=[_tensor_metadata(s) for s in meta.inputs],
                                    outputs=[_tensor_metadata(s) for s in meta.outputs])


def _config_type(datatype: str) -> int:
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return mc.DataType.Value(name) if name in mc.DataType.keys() else mc.TYPE_INVALID


def model_config_to_proto(cfg: ModelConfigInfo) -> pb.ModelConfigResponse:
    """Triton's scheduling_choice is a oneof: a model with sequence_batching carries its
    dynamic batching inside it, as the `oldest` strategy (Triton's equivalent)."""
    config = mc.ModelConfig(
        name=cfg.name, platform=cfg.platform, max_batch_size=cfg.max_batch_size,
        backend="onnxruntime" if cfg.platform == "onnxruntime_onnx" else "",
        input=[mc.ModelInput(name=s.name, data_type=_config_type(s.datatype), dims=s.shape,
                             optional=s.optional) for s in cfg.inputs],
        output=[mc.ModelOutput(name=s.name, data_type=_config_type(s.datatype), dims=s.shape)
                for s in cfg.outputs])
    config.instance_group.add(count=cfg.instance_count)
    for key, value in cfg.parameters.items():
        config.parameters[key].string_value = value
    dyn = cfg.dynamic_batching
    if cfg.sequence_batching is not None:
        seq = config.sequence_batching
        seq.max_sequence_idle_microseconds = int(
            cfg.sequence_batching.get("max_sequence_idle_microseconds", 0))
        for state in cfg.sequence_batching.get("states", []):
            seq.state.add(
                input_name=state.input_name, output_name=state.output_name,
                data_type=_config_type(state.datatype), dims=state.dims,
                initial_state=[mc.ModelSequenceBatching.InitialState(
                    name=f"{state.input_name}_zero", data_type=_config_type(state.datatype),
                    dims=state.dims, zero_data=True)])
        if dyn is not None:
            seq.oldest.preferred_batch_size.extend(dyn.get("preferred_batch_size", []))
            seq.oldest.max_queue_delay_microseconds = int(
                dyn.get("max_queue_delay_microseconds", 0))
    elif dyn is not None:
        config.dynamic_batching.preferred_batch_size.extend(dyn.get("preferred_batch_size", []))
        config.dynamic_batching.max_queue_delay_microseconds = int(
            dyn.get("max_queue_delay_microseconds", 0))
    return pb.ModelConfigResponse(config=config)


def _duration(target, stat) -> None:
    target.count, target.ns = stat.count, stat.ns


def model_stats_to_proto(stats: list[ModelStats]) -> pb.ModelStatisticsResponse:
    msg = pb.ModelStatisticsResponse()
    for s in stats:
        out = msg.model_stats.add(name=s.name, version=s.version,
                                  last_inference=s.last_inference_ms,
                                  inference_count=s.inference_count,
                                  execution_count=s.execution_count)
        for field in ("success", "fail", "queue", "compute_input", "compute_infer",
                      "compute_output"):
            _duration(getattr(out.inference_stats, field), getattr(s, field))
        for size in sorted(s.batch_stats):
            batch = out.batch_stats.add(batch_size=size)
            _duration(batch.compute_infer, s.batch_stats[size])
    return msg


def repository_index_to_proto(entries: list[RepositoryEntry], ready_only: bool
                              ) -> pb.RepositoryIndexResponse:
    msg = pb.RepositoryIndexResponse()
    for e in entries:
        if not ready_only or e.state == "READY":
            msg.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
    return msg


# ---- text API ---------------------------------------------------------------

def _positions_to_proto(result: PredictResult) -> list:
    return [tpb.PositionPrediction(index=p.index, input_char=p.input_char, char=p.char,
                                   prob=p.prob,
                                   top=[tpb.CharProb(char=c.char, prob=c.prob) for c in p.top])
            for p in result.positions]


def predict_to_proto(result: PredictResult) -> tpb.PredictResponse:
    return tpb.PredictResponse(model=result.model_name, version=result.model_version,
                               decoded=result.decoded, positions=_positions_to_proto(result))


def stream_response_to_proto(result: PredictResult, chunk: int) -> tpb.StreamResponse:
    """One TextService.Stream answer: chunk `chunk`'s predictions (the Predict per-position message)."""
    return tpb.StreamResponse(model=result.model_name, version=result.model_version, chunk=chunk,
                              decoded=result.decoded, positions=_positions_to_proto(result))


def stream_open_args(req: tpb.StreamRequest, default_top_k: int) -> dict:
    """Keyword arguments for DataPlane.open_text_stream from the first StreamRequest."""
    if not req.model:
        raise InvalidArgument("the first StreamRequest must name the model")
    return dict(model=req.model, version=req.version, top_k=req.top_k or default_top_k)


def check_stream_followup(req: tpb.StreamRequest, first: tpb.StreamRequest) -> None:
    """A later StreamRequest may repeat the first one's model/version/top_k, never change them."""
    for name in ("model", "version", "top_k"):
        value = getattr(req, name)
        if value and value != getattr(first, name):
            raise InvalidArgument(f"StreamRequest.{name} is set by the first message of a stream "
                                  f"({quoted(getattr(first, name))}); a later message cannot change it "
                                  f"to {quoted(value)}")
    if not req.text:
        raise InvalidArgument("an empty text chunk: only the first StreamRequest may omit text")


def generate_event_to_proto(event: GenerateEvent) -> tpb.GenerateResponse:
    return tpb.GenerateResponse(index=event.index, token_id=event.token_id, text=event.text,
                                finish_reason=event.finish_reason)


def generate_args_from_proto(req: tpb.GenerateRequest) -> dict:
    """Keyword arguments for DataPlane.generate (unset optional fields -> defaults)."""
    return dict(model=req.model, version=req.version, prompt=req.prompt,
                max_tokens=req.max_tokens,
                temperature=req.temperature if req.HasField("temperature") else 1.0,
                top_k=req.top_k, top_p=req.top_p if req.HasField("top_p") else 1.0,
                seed=req.seed if req.HasField("seed") else None, stop=list(req.stop))


def score_to_proto(result: ScoreResult) -> tpb.ScoreResponse:
    return tpb.ScoreResponse(model=result.model_name, version=result.model_version,
                             log_likelihood=result.log_likelihood,
                             nats_per_char=result.nats_per_char,
                             bits_per_char=result.bits_per_char,
                             num_predicted=result.num_predicted)
