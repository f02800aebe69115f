"""Many sequences in one request: the reserved control inputs.

A ModelInfer request (unary or streamed) whose inputs include `sequence_id`
(UINT64, INT64 or BYTES, shape [batch]) carries one step of a different sequence
in each row: row i of every other input belongs to sequence `sequence_id[i]`, and
`sequence_start` / `sequence_end` (BOOL, shape [batch], optional: all false)
are that row's START and END flags, with the meaning the request parameters of
the same names have for a single sequence. An id is an unsigned integer or a
UTF-8 string, as the `sequence_id` parameter is, and names the same sequence
either way.

Each row is one step of its sequence through the model's SequenceManager, so the
sequences' rules, order and state store apply per row; the rows are queued inside
Batcher.together(), so they share one onnxruntime run whenever their sequences are
free to step. Before any row is queued the whole request is checked: an id this
process does not hold (nor a shared state store) without START, or more new
sequences than --max-sequences allows, refuses it with nothing changed. A row
that fails later (its sequence's own rules, a deadline) fails the request; the
other rows' steps may then have been applied.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnnserve.serve.errors import InvalidArgument, ServeError, Unavailable
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


def _row_id(i: int, value):
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"row {i}: sequence_id {_quote(value)} is not UTF-8 text") from None
        if not text:
            raise InvalidArgument(f"row {i}: sequence_id is empty; every row needs a sequence id")
        return text
    if value <= 0:
        raise InvalidArgument(f"row {i}: sequence_id {int(value)} is not a sequence id (ids are >= 1)")
    return int(value)


def _ids(array: np.ndarray, declared: str | None) -> list:
    datatype = declared or ("BYTES" if array.dtype == object else str(array.dtype).upper())
    if datatype not in ID_DATATYPES or (datatype == "BYTES") != (array.dtype == object):
        raise InvalidArgument(f"input 'sequence_id' must be {', '.join(ID_DATATYPES[:-1])} or BYTES, "
                              f"got {datatype}")
    if array.ndim != 1 or array.shape[0] == 0:
        raise InvalidArgument(f"input 'sequence_id' must have shape [batch], got {list(array.shape)}")
    ids = [_row_id(i, v) for i, v in enumerate(array.tolist())]
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
    return [bool(v) for v in array.tolist()]


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


def _check_new(engine: Any, rows: SequenceRows) -> None:
    """Refuse the request, before any row is queued, if a row's id needs a START it lacks or
    the new sequences would pass --max-sequences."""
    sequences = engine.sequences
    new = 0
    for i, (key, start) in enumerate(zip(rows.ids, rows.start)):
        if sequences.holds(key):
            continue
        if start:
            new += 1
        elif sequences.stored_version(key) is None:
            raise InvalidArgument(f"row {i}: sequence {_quote(key)} is not active on model "
                                  f"'{engine.inst.name}': its first request must set sequence_start=true "
                                  "(START is required)")
    if new and sequences.live() + new > sequences.max_sequences:
        raise Unavailable(f"model '{engine.inst.name}': too many live sequences ({sequences.max_sequences}); "
                          "end some sequences (sequence_end) or retry later")


def _row(array: np.ndarray, axis: int | None, i: int) -> np.ndarray:
    return array if axis is None else array[(slice(None),) * axis + (slice(i, i + 1),)]


def submit(engine: Any, rows: SequenceRows, inputs: dict[str, np.ndarray], deadline: float | None,
           is_cancelled) -> Future:
    """Queue row i of the inputs (along each input's batch axis) as one step of sequence
    rows.ids[i] (engine: a ModelEngine of a streamable model); -> a Future of the outputs of
    every row, row i from sequence i, stacked along each output's batch axis."""
    _check_new(engine, rows)
    axes = {t.name: t.batch_axis for t in engine.io.inputs}
    futures: list[Future] = []
    with engine.batcher.together():
        for i, key in enumerate(rows.ids):
            row = {name: _row(array, axes.get(name), i) for name, array in inputs.items()}
            try:
                futures.append(engine.submit_step(key, row, start=rows.start[i], end=rows.end[i],
                                                  deadline=deadline, is_cancelled=is_cancelled))
            except ServeError as exc:
                if not futures:
                    raise
                failed: Future = Future()
                failed.set_exception(type(exc)(f"row {i}: {exc}"))
                futures.append(failed)
    out_axes = {t.name: t.batch_axis for t in engine.io.outputs}
    out_axes.update({s.output: s.batch_axis for s in engine.io.states})
    return _gathered(futures, out_axes)


def _gathered(futures: list[Future], axes: dict[str, int | None]) -> Future:
    """One Future of every row's outputs, stacked along each output's batch axis."""
    result: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_fut: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        failed = next(((i, f.exception()) for i, f in enumerate(futures) if f.exception() is not None), None)
        if failed is not None:
            i, exc = failed
            result.set_exception(exc if str(exc).startswith("row ") or not isinstance(exc, ServeError)
                                 else type(exc)(f"row {i}: {exc}"))
            return
        outs = [f.result() for f in futures]
        result.set_result({name: np.concatenate([o[name] for o in outs], axis=axes.get(name) or 0)
                           for name in outs[0]})

    for fut in futures:
        fut.add_done_callback(one_done)
    return result
