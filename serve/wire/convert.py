"""The one module converting between protobuf messages and numpy: tensors, inference
requests and responses (shared by the server and our client). Everything else that
crosses the wire (metadata, config, statistics, the text API) is serve/wire/messages.py's.

Tensors travel little-endian, row-major and unpadded. Requests may carry them in
`raw_input_contents` (one blob per input, in input order; what tritonclient
sends) or in each input's typed `contents`; responses always use
`raw_output_contents`, the only place tritonclient reads. Everything a client
can get wrong here raises serve.errors.InvalidArgument with a message that says
what is wrong. This runs for every request on the server's event loop, so the
common case (a raw tensor of a known datatype) takes one dictionary lookup per
fact; the checks that build messages run only when something is wrong.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import numpy as np

from rnnserve.serve.errors import InvalidArgument, quoted
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.types import InferRequest, InferResponse, ParamValue

# Open Inference Protocol datatype -> numpy dtype (little-endian on the wire).
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code).newbyteorder("<") for name, code in {
        "BOOL": "?", "UINT8": "u1", "UINT16": "u2", "UINT32": "u4", "UINT64": "u8",
        "INT8": "i1", "INT16": "i2", "INT32": "i4", "INT64": "i8",
        "FP16": "f2", "FP32": "f4", "FP64": "f8"}.items()}
DATATYPES = tuple(NUMPY_DTYPES) + ("BYTES", "BF16")   # every name the protocol knows
# numpy dtype (by its .str, either byte order) -> datatype, for the answers
_DATATYPE_OF = {**{dt.newbyteorder("<").str: name for name, dt in NUMPY_DTYPES.items()},
                **{dt.newbyteorder(">").str: name for name, dt in NUMPY_DTYPES.items()}}
_DATATYPE_OF.update({np.dtype(np.bool_).str: "BOOL", np.dtype(np.int8).str: "INT8", np.dtype(np.uint8).str: "UINT8"})
_LITTLE = sys.byteorder == "little"   # wire order is native: no byte swapping

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
    out: dict[str, ParamValue] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, choice) if choice is not None else param_value(key, param)
    return out


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
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is not None:
        return dtype
    if datatype in DATATYPES:
        raise InvalidArgument(f"input {quoted(tensor_name)}: datatype {datatype} is not supported")
    raise InvalidArgument(f"input {quoted(tensor_name)}: unknown datatype {quoted(datatype)}; "
                          f"expected one of {', '.join(DATATYPES)}")


def _shape_of(tensor_name: str, dims) -> tuple:
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"input {quoted(tensor_name)}: shape has {len(dims)} dimensions, "
                              f"over the limit of {MAX_RANK}")
    shape = tuple(dims)
    if shape and min(shape) < 0:
        negative = [d for d in shape if d < 0]
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
    flat = np.frombuffer(raw, dtype=dtype)
    if not _LITTLE:
        flat = flat.astype(dtype.newbyteorder("="))
    return _reshape(name, flat, shape)


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
    datatype = _DATATYPE_OF.get(array.dtype.str)
    if datatype is None:
        raise TypeError(f"no protocol datatype for numpy dtype {array.dtype}")
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
        array = array.astype(NUMPY_DTYPES[datatype])
    return datatype, array.tobytes()   # row-major, whatever the array's own layout


# ---- inference --------------------------------------------------------------

def deadline_from(time_remaining: float | None) -> float | None:
    """time.monotonic() by which the call must start running, from grpc's time_remaining()."""
    if time_remaining is None or time_remaining >= NO_DEADLINE_S:
        return None
    return time.monotonic() + max(time_remaining, 0.0)


def infer_request_from_proto(msg: pb.ModelInferRequest, time_remaining: float | None = None,
                             is_cancelled: Callable[[], bool] | None = None) -> InferRequest:
    raw = msg.raw_input_contents
    tensors = msg.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(tensors)} inputs; "
                              f"send one per input, in input order")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(tensors):
        name, datatype = tensor.name, tensor.datatype
        if name in inputs:
            raise InvalidArgument(f"input {quoted(name)} is given twice")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input {quoted(name)}: contents must be empty when "
                                      f"raw_input_contents is used")
            inputs[name] = tensor_from_raw(name, datatype, tensor.shape, raw[i])
        else:
            inputs[name] = tensor_from_contents(name, datatype, tensor.shape, tensor.contents)
        datatypes[name] = datatype
    outputs = msg.outputs
    params = msg.parameters
    return InferRequest(model_name=msg.model_name, model_version=msg.model_version, id=msg.id,
                        inputs=inputs, input_datatypes=datatypes,
                        requested_outputs=[out.name for out in outputs] if outputs else None,
                        parameters=params_from_proto(params) if params else {},
                        deadline=deadline_from(time_remaining), is_cancelled=is_cancelled)


def infer_response_to_proto(resp: InferResponse, msg: pb.ModelInferResponse | None = None
                            ) -> pb.ModelInferResponse:
    """The answer's message; `msg`: fill this one (a ModelStreamInferResponse's infer_response,
    built in place rather than copied in)."""
    if msg is None:
        msg = pb.ModelInferResponse()
    msg.model_name, msg.model_version, msg.id = resp.model_name, resp.model_version, resp.id
    if resp.parameters:
        params_to_proto(resp.parameters, msg.parameters)
    add_output, blobs = msg.outputs.add, msg.raw_output_contents
    for name, array in resp.outputs:
        datatype, blob = tensor_to_raw(array)
        add_output(name=name, datatype=datatype, shape=array.shape)
        blobs.append(blob)
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
