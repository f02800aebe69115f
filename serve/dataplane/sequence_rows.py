"""Many sequences in one request: the reserved control inputs.

A ModelInfer request (unary or streamed) whose inputs include `sequence_id`
(UINT64, INT64 or BYTES, shape [batch]) carries one step of a different sequence
in each row: row i of every other input belongs to sequence `sequence_id[i]`, and
`sequence_start` / `sequence_end` (BOOL, shape [batch], optional: all false)
are that row's START and END flags, with the meaning the request parameters of
the same names have for a single sequence. An id is an unsigned integer or a
UTF-8 string, as the `sequence_id` parameter is, and names the same sequence
either way.

This module reads the control inputs; the model's SequenceManager runs the rows
(SequenceManager.submit_rows, serve/engine/sequence_units.py): each row is one step of
its sequence, with the sequences' rules, order and state store, and the request runs as
one unit (one Work, its rows' states stacked) whenever its sequences may all step.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from rnnserve.serve.errors import InvalidArgument
from rnnserve.serve.wire.types import TensorSpec

SEQUENCE_ID = "sequence_id"
SEQUENCE_START = "sequence_start"
SEQUENCE_END = "sequence_end"
CONTROL_INPUTS = (SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END)
ID_DATATYPES = ("UINT64", "INT64", "BYTES")
# What ModelMetadata / ModelConfig show for streamable models (optional inputs).
CONTROL_SPECS = (TensorSpec(SEQUENCE_ID, "UINT64", [-1], optional=True),
                 TensorSpec(SEQUENCE_START, "BOOL", [-1], optional=True),
                 TensorSpec(SEQUENCE_END, "BOOL", [-1], optional=True))
MAX_QUOTED = 40   # characters of a client's string quoted back in a message


@dataclass
class SequenceRows:
    ids: list            # int or str, one per row, distinct
    start: list[bool]
    end: list[bool]


def _quote(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."


def _text_id(i: int, value: bytes) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"row {i}: sequence_id {_quote(value)} is not UTF-8 text") from None
    if not text:
        raise InvalidArgument(f"row {i}: sequence_id is empty; every row needs a sequence id")
    return text


def _ids(array: np.ndarray, declared: str | None) -> list:
    datatype = declared or ("BYTES" if array.dtype == object else str(array.dtype).upper())
    if datatype not in ID_DATATYPES or (datatype == "BYTES") != (array.dtype == object):
        raise InvalidArgument(f"input 'sequence_id' must be {', '.join(ID_DATATYPES[:-1])} or BYTES, "
                              f"got {datatype}")
    if array.ndim != 1 or array.shape[0] == 0:
        raise InvalidArgument(f"input 'sequence_id' must have shape [batch], got {list(array.shape)}")
    if array.dtype == object:
        ids = [_text_id(i, v) for i, v in enumerate(array.tolist())]
    else:
        bad = array <= 0
        if bad.any():
            i = int(bad.argmax())
            raise InvalidArgument(f"row {i}: sequence_id {int(array[i])} is not a sequence id (ids are >= 1)")
        ids = array.tolist()
    if len(set(ids)) < len(ids):   # name the first repeat
        first: dict = {}
        for i, key in enumerate(ids):
            if key in first:
                raise InvalidArgument(f"rows {first[key]} and {i}: sequence_id {_quote(key)} appears twice; "
                                      "a sequence may have one row per request")
            first[key] = i
    return ids


def _flags(name: str, inputs: Mapping[str, np.ndarray], declared: str | None, rows: int) -> list[bool]:
    if name not in inputs:
        return [False] * rows
    array = inputs[name]
    if (declared or "BOOL") != "BOOL" or array.dtype != np.bool_:
        raise InvalidArgument(f"input '{name}' must be BOOL, got {declared or array.dtype}")
    if array.shape != (rows,):
        raise InvalidArgument(f"input '{name}' must have shape [{rows}] like 'sequence_id', "
                              f"got {list(array.shape)}")
    return array.tolist()


def take(inputs: Mapping[str, np.ndarray], datatypes: Mapping[str, str]
         ) -> tuple[Mapping[str, np.ndarray], SequenceRows | None]:
    """-> (the model's inputs, the rows' sequences, or None for an ordinary request)."""
    if not any(name in inputs for name in CONTROL_INPUTS):
        return inputs, None
    if SEQUENCE_ID not in inputs:
        raise InvalidArgument("inputs 'sequence_start' / 'sequence_end' need an input 'sequence_id' "
                              "(one id per row)")
    ids = _ids(inputs[SEQUENCE_ID], datatypes.get(SEQUENCE_ID))
    rows = SequenceRows(ids, _flags(SEQUENCE_START, inputs, datatypes.get(SEQUENCE_START), len(ids)),
                        _flags(SEQUENCE_END, inputs, datatypes.get(SEQUENCE_END), len(ids)))
    return {k: v for k, v in inputs.items() if k not in CONTROL_INPUTS}, rows
