"""How large an answer will be, checked against --max-response-bytes before the run.

gRPC's send limit is --max-response-bytes too (serve/frontend/server.py). Every size here
is an upper bound of the encoded protobuf message, so an answer that passes the check is
always one gRPC sends; an answer over it is refused with INVALID_ARGUMENT naming both
numbers, before onnxruntime runs, instead of computing it and failing at the send.

- Tensor answers (ModelInfer, ModelStreamInfer): the requested outputs' shapes follow from
  the request (the batch axis is its rows, the time axis its length, the other dims are
  the model's declared sizes) and the state outputs from their declared shapes. A model
  that declares an output dim only symbolically (not batch, not time) cannot be sized
  ahead: its answer is checked once computed (`check_response`), still before sending.
- Text answers (Predict, one Stream chunk): one PositionPrediction per character, each
  with up to top_k alternatives. Generate sends one token per message and Score a few
  numbers: both far below any limit.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rnnserve.serve.engine.modelio import ModelIO
from rnnserve.serve.errors import InvalidArgument
from rnnserve.serve.wire.types import InferResponse

FIELD_BYTES = 11             # a field's tag (fields < 16: 1 byte) and length varint (at most 10)
DIM_BYTES = 10               # one int64 shape dim, varint
# Text: a PositionPrediction holds index (6), input_char and char (6 each: <= 4 UTF-8 bytes),
# prob (5), its own tag and length (<= 6) and the character in `decoded` (4): 33 -> 40;
# each alternative is a CharProb (char 6 + prob 5) with its tag and length (2): 13 -> 16.
POSITION_BYTES = 40
ALTERNATIVE_BYTES = 16


def _tensor_bytes(name: str, nbytes: int, rank: int) -> int:
    """An InferOutputTensor (name, datatype, shape) and its raw_output_contents entry."""
    return nbytes + FIELD_BYTES + len(name) + 8 + rank * DIM_BYTES + 4 * FIELD_BYTES


def _envelope(model: str, version: str, request_id: str, parameters: Mapping[str, object]) -> int:
    """The message's own fields, and ModelStreamInferResponse's wrapper around it in a stream."""
    params = sum(len(str(k)) + len(str(v)) + 4 * FIELD_BYTES for k, v in parameters.items()) if parameters else 0
    return len(model) + len(version) + len(request_id) + 4 * FIELD_BYTES + params


def tensor_answer_bytes(io: ModelIO, outputs: Sequence[str], feeds: Mapping[str, np.ndarray],
                        model: str, version: str, request_id: str) -> int | None:
    """Upper bound of the answer's size for the requested outputs; None when a declared dim is
    neither fixed nor the batch or time axis (the answer is then checked once computed)."""
    rows, steps = io.rows(feeds), io.time_len(feeds)
    total = _envelope(model, version, request_id, {})
    for name in outputs:
        size = io.output_bytes(name, rows, steps)
        if size is None:
            return None
        total += _tensor_bytes(name, *size)
    return total


def response_bytes(resp: InferResponse) -> int:
    """Upper bound of a computed answer's size."""
    return _envelope(resp.model_name, resp.model_version, resp.id, resp.parameters) + sum(
        _tensor_bytes(name, a.nbytes, a.ndim) for name, a in resp.outputs)


def text_answer_bytes(model: str, version: str, positions: int, top_k: int) -> int:
    """Upper bound of a Predict answer (or one Stream chunk's) for `positions` characters."""
    return _envelope(model, version, "", {}) + 2 * FIELD_BYTES + positions * (POSITION_BYTES
                                                                              + top_k * ALTERNATIVE_BYTES)


def check(size: int | None, limit: int, what: str, hint: str) -> None:
    """InvalidArgument when `size` (bytes) is over `limit` (None: not known yet, passes)."""
    if size is not None and size > limit:
        raise InvalidArgument(f"the answer to this {what} would be {size} bytes, over the server's "
                              f"maximum of {limit} (--max-response-bytes); {hint}")


def check_text(model: str, version: str, positions: int, top_k: int, limit: int, what: str) -> None:
    """InvalidArgument when a text answer over `positions` characters could exceed `limit`."""
    check(text_answer_bytes(model, version, positions, top_k), limit, what, TEXT_HINT)


def check_response(resp: InferResponse, limit: int) -> InferResponse:
    """The computed answer, or InvalidArgument when it is over the limit (models whose
    answer size could not be known ahead: see tensor_answer_bytes)."""
    check(response_bytes(resp), limit, "request", TENSOR_HINT)
    return resp


TENSOR_HINT = "send fewer rows or a shorter sequence, or request fewer outputs (only the state outputs, say)"
TEXT_HINT = "send shorter text or ask for a smaller top_k"
