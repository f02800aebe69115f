"""Checks every client input before onnxruntime sees it.

onnxruntime aborts the whole process on some empty inputs and silently wraps
negative token ids, so nothing reaches ModelInstance.run unchecked: every input
follows its declared dtype and shape (rnnserve/modelspec.py), and float inputs
hold no NaN/Inf unless the model allows them (config.pbtxt allow_nonfinite). Every
problem raises serve.errors.InvalidArgument with a message that says exactly
what is wrong. (Raw-byte length against shape is checked by serve/wire/convert.py.)
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

from rnnserve.contract import INPUT_TOKENS, text_api_refusal
from rnnserve.modelspec import DTYPES, StatePair, TensorDecl
from rnnserve.serve.engine.runtime import ModelInstance
from rnnserve.serve.errors import FailedPrecondition, InvalidArgument, quoted
from rnnserve.serve.wire.types import ParamValue
from rnnserve.serving import PARAM_ALLOW_NONFINITE

MAX_SEQUENCE_ID_CHARS = 256   # a string sequence_id is kept while its sequence lives
MAX_STOP_STRINGS = 32         # Generate: every stop string is checked after every token
MAX_STOP_CHARS = 1024         # ... and their total length

# numpy dtype (by its .str, e.g. "<i8") -> Open Inference Protocol datatype
_DATATYPES = {np.dtype(t).str: name for t, name in (
    (np.bool_, "BOOL"), (np.uint8, "UINT8"), (np.uint16, "UINT16"), (np.uint32, "UINT32"),
    (np.uint64, "UINT64"), (np.int8, "INT8"), (np.int16, "INT16"), (np.int32, "INT32"), (np.int64, "INT64"),
    (np.float16, "FP16"), (np.float32, "FP32"), (np.float64, "FP64"))}


def datatype_of(arr: np.ndarray) -> str:
    dt = arr.dtype
    return _DATATYPES.get(dt.str) or ("BYTES" if dt.kind in "OSU" else str(dt))


# -- request parameters ------------------------------------------------------------------------
@dataclass
class RequestParams:
    sequence_id: int | str = 0     # 0 or "" = not part of a sequence
    sequence_start: bool = False
    sequence_end: bool = False
    sequence_step: int | None = None     # the step's id (exactly once; see engine/sequences.py)
    priority: int = 0
    timeout_us: int = 0                  # 0 = none

    @property
    def in_sequence(self) -> bool:
        return self.sequence_id not in (0, "")


def _is_int(v: object) -> TypeGuard[int | np.integer]:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_parameters(params: Mapping[str, ParamValue]) -> RequestParams:
    """Validate the reserved parameters; other parameters pass through untouched."""
    p = RequestParams()
    if not params:
        return p
    if "sequence_id" in params:
        v = params["sequence_id"]
        if isinstance(v, str):
            if len(v) > MAX_SEQUENCE_ID_CHARS:
                raise InvalidArgument(f"parameter 'sequence_id' has {len(v)} characters, over the limit "
                                      f"of {MAX_SEQUENCE_ID_CHARS}")
            p.sequence_id = v
        elif _is_int(v) and v >= 0:
            p.sequence_id = int(v)
        else:
            raise InvalidArgument(f"parameter 'sequence_id' must be a non-negative integer or a string, "
                                  f"got {type(v).__name__} {quoted(v)}")
    for key in ("sequence_start", "sequence_end"):
        if key in params:
            v = params[key]
            if not isinstance(v, (bool, np.bool_)):
                raise InvalidArgument(f"parameter '{key}' must be a bool, got {type(v).__name__} {quoted(v)}")
            setattr(p, key, bool(v))
    if "sequence_step" in params:
        v = params["sequence_step"]
        if not _is_int(v) or v < 0:
            raise InvalidArgument(f"parameter 'sequence_step' must be a non-negative integer, "
                                  f"got {type(v).__name__} {v!r}")
        p.sequence_step = int(v)
    for key, attr in (("priority", "priority"), ("timeout", "timeout_us")):
        if key in params:
            v = params[key]
            if not _is_int(v) or v < 0:
                unit = " (microseconds)" if key == "timeout" else ""
                raise InvalidArgument(f"parameter '{key}' must be a non-negative integer{unit}, "
                                      f"got {type(v).__name__} {quoted(v)}")
            setattr(p, attr, int(v))
    if (p.sequence_start or p.sequence_end or p.sequence_step is not None) and not p.in_sequence:
        raise InvalidArgument("parameters 'sequence_start'/'sequence_end'/'sequence_step' need a non-zero "
                              "'sequence_id'")
    return p


def parameters_or_none(params: Mapping[str, ParamValue]) -> RequestParams | None:
    """The checked parameters, or None when they are invalid (for routing: the request is
    refused where it runs, after the model lookup's own errors)."""
    try:
        return check_parameters(params)
    except InvalidArgument:
        return None


MAX_STEP_DIGITS = 18   # a numeric request id longer than this is not a step id (int64 range)


def step_id(params: RequestParams, request_id: str) -> int | None:
    """A sequence step's id: the `sequence_step` parameter, else the request id when it is a
    decimal number, else None (the step is numbered by the server)."""
    if params.sequence_step is not None:
        return params.sequence_step
    if request_id.isdigit() and request_id.isascii() and len(request_id) <= MAX_STEP_DIGITS:
        return int(request_id)
    return None


# -- tensors -----------------------------------------------------------------------------------
class _Table:
    """What the per-request checks read of one model, computed once (a request's checks then
    take a dictionary lookup or two per tensor)."""

    def __init__(self, inst: ModelInstance):
        spec = inst.spec
        self.input_names = frozenset(inst.input_names)
        self.output_names = tuple(inst.output_names)
        self.output_set = frozenset(inst.output_names)
        # (declaration, datatype, whether the values are token ids to range-check)
        self.inputs = tuple((t, DTYPES[t.dtype], t.name == INPUT_TOKENS and bool(inst.vocab)) for t in spec.inputs)
        self.states = tuple((pair, DTYPES[pair.dtype]) for pair in spec.states)
        self.vocab_size = inst.vocab_size


_TABLES: weakref.WeakKeyDictionary[ModelInstance, _Table] = weakref.WeakKeyDictionary()


def _table(inst: ModelInstance) -> _Table:
    table = _TABLES.get(inst)
    if table is None:
        table = _TABLES[inst] = _Table(inst)
    return table


def check_outputs(inst: ModelInstance, requested: Sequence[str] | None) -> list[str]:
    """The output names to compute: all of them when none are requested."""
    table = _table(inst)
    if not requested:
        return list(table.output_names)
    if len(requested) == 1 and requested[0] in table.output_set:
        return list(requested)
    seen = set()
    for name in requested:
        if name not in table.output_set:
            raise InvalidArgument(f"unknown output {quoted(name)} requested from model '{inst.name}'; "
                                  f"its outputs are: {', '.join(inst.output_names)}")
        if name in seen:
            raise InvalidArgument(f"output {quoted(name)} is requested twice")
        seen.add(name)
    return list(requested)


SMALL_TENSOR = 16   # elements: checked in Python, quicker than a numpy reduction


def check_token_ids(inst: ModelInstance, tokens: np.ndarray) -> None:
    # The fast paths. A streamed step holds a token or a few; otherwise one reduction and no
    # temporaries: seen as unsigned, a negative id is huge.
    if tokens.size <= SMALL_TENSOR:
        ids = tokens.ravel().tolist()
        if ids and min(ids) >= 0 and max(ids) < inst.vocab_size:
            return
    else:
        unsigned = tokens.view(f"u{tokens.dtype.itemsize}") if tokens.dtype.kind == "i" else tokens
        if unsigned.max() < inst.vocab_size:
            return
    bad = (tokens < 0) | (tokens >= inst.vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        count = int(bad.sum())
        more = f" ({count} ids out of range in all)" if count > 1 else ""
        raise InvalidArgument(f"token id {int(tokens[where])} at position {list(where)} is out of range for "
                              f"model '{inst.name}': valid ids are 0..{inst.vocab_size - 1} "
                              f"(vocab size {inst.vocab_size}){more}")


def _check_dtype(name: str, arr: np.ndarray, declared: str | None, want: str) -> None:
    got = declared or datatype_of(arr)
    if got != want:
        raise InvalidArgument(f"input '{name}' must be {want}, got {got}")
    if datatype_of(arr) != want:  # the declared type and the data disagree
        raise InvalidArgument(f"input '{name}' is declared {want} but its data is {datatype_of(arr)}")


def _shape_text(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_shape(t: TensorDecl, arr: np.ndarray, sizes: dict[str, tuple[int, str]], max_seq_len: int) -> None:
    """Rank, fixed dims, no empty dim, dynamic dims within max_seq_len (the batch axis aside) and
    equal sizes wherever two inputs share a dim name (`sizes`: name -> (size, first input))."""
    name, want = t.name, t.shape
    if arr.ndim != len(want):
        raise InvalidArgument(f"input '{name}' must have rank {len(want)} {_shape_text(want)}, "
                              f"got shape {list(arr.shape)}")
    if 0 in arr.shape:
        dims = " and ".join(str(d) for d in want if isinstance(d, str)) or "every dim"
        raise InvalidArgument(f"input '{name}' has shape {list(arr.shape)}: {dims} must be >= 1")
    for axis, (d, n) in enumerate(zip(want, arr.shape)):
        if isinstance(d, int):
            if n != d:
                raise InvalidArgument(f"input '{name}' has shape {list(arr.shape)}; the model takes "
                                      f"{_shape_text(want)} (dim {axis} must be {d})")
            continue
        if axis != t.batch_axis and n > max_seq_len:
            raise InvalidArgument(f"input '{name}' has {d} {n}, over the server's maximum of {max_seq_len}")
        first = sizes.setdefault(d, (int(n), name))
        if first[0] != n:
            raise InvalidArgument(f"input '{name}' has {d} {n} but input '{first[1]}' has {d} {first[0]}")


def check_finite(inst: ModelInstance, what: str, arr: np.ndarray) -> None:
    """NaN and Inf in a float input are refused unless the model allows them (allow_nonfinite)."""
    if arr.dtype.kind != "f" or inst.allow_nonfinite or np.isfinite(arr).all():
        return
    where = [int(i) for i in np.argwhere(~np.isfinite(arr))[0]]
    raise InvalidArgument(f"{what} contains NaN or Inf (first at position {where}); model '{inst.name}' "
                          f"does not accept them (config.pbtxt parameter {PARAM_ALLOW_NONFINITE})")


def check_state(inst: ModelInstance, pair: StatePair, state: np.ndarray, batch: int) -> None:
    want = list(pair.concrete_shape(batch))
    if list(state.shape) != want:
        raise InvalidArgument(f"state input '{pair.input}' has shape {list(state.shape)}, expected {want} "
                              f"{_shape_text(pair.shape)} with batch {batch} as in the other inputs")
    check_finite(inst, f"state input '{pair.input}'", state)


def check_infer_inputs(inst: ModelInstance, inputs: Mapping[str, np.ndarray],
                       datatypes: Mapping[str, str], max_seq_len: int, max_batch: int) -> dict[str, np.ndarray]:
    """Validated, C-contiguous feeds for ModelInstance.run (omitted states stay omitted = zeros)."""
    table = _table(inst)
    for name in inputs:
        if name in table.input_names:
            continue
        if inst.bidirectional and name in ("h0", "c0"):
            raise InvalidArgument(f"model '{inst.name}' is bidirectional and takes no state inputs "
                                  f"(got {quoted(name)}): it reads the whole sequence at once")
        raise InvalidArgument(f"unknown input {quoted(name)} for model '{inst.name}'; "
                              f"its inputs are: {', '.join(inst.input_names)}")
    for name, value in inputs.items():
        if not isinstance(value, np.ndarray):
            raise InvalidArgument(f"input {quoted(name)} must be a tensor, got {type(value).__name__}")
    feeds: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, str]] = {}
    for t, want, token_ids in table.inputs:
        arr = inputs.get(t.name)
        if arr is None:
            raise InvalidArgument(f"missing input '{t.name}' ({t.datatype} {_shape_text(t.shape)}) "
                                  f"for model '{inst.name}'")
        declared = datatypes.get(t.name)
        if (declared is not None and declared != want) or _DATATYPES.get(arr.dtype.str) != want:
            _check_dtype(t.name, arr, declared, want)
        check_shape(t, arr, sizes, max_seq_len)
        if token_ids:
            check_token_ids(inst, arr)
        if arr.dtype.kind == "f":
            check_finite(inst, f"input '{t.name}'", arr)
        feeds[t.name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
    batch = inst.io.rows(feeds)
    if batch > max_batch:
        raise InvalidArgument(f"the request has batch {batch}, over the server's maximum of {max_batch} "
                              f"(--max-batch-size); split the request")
    for pair, want in table.states:
        if pair.input in inputs:
            state = inputs[pair.input]
            _check_dtype(pair.input, state, datatypes.get(pair.input), want)
            check_state(inst, pair, state, batch)
            feeds[pair.input] = np.ascontiguousarray(state)
    return feeds


def check_text_model(inst: ModelInstance) -> None:
    """The text API needs a vocabulary (and tokens in, logits out)."""
    if not inst.vocab:
        raise FailedPrecondition(f"model '{inst.name}' has no vocabulary: the text API serves character "
                                 "models; use the tensor API (ModelInfer)")
    if not inst.takes_text:
        raise FailedPrecondition(f"model '{inst.name}' does not take text (tokens in, logits out); "
                                 "use the tensor API (ModelInfer)")


# -- text --------------------------------------------------------------------------------------
def encode_text(inst: ModelInstance, text: str, max_seq_len: int, what: str = "text") -> np.ndarray:
    """Characters -> int64 ids [len]; names every character the vocabulary lacks."""
    if inst.multichar_tokens:
        raise InvalidArgument(text_api_refusal(f"model '{inst.name}'", inst.multichar_tokens))
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"{what} must not be empty")
    if len(text) > max_seq_len:
        raise InvalidArgument(f"{what} has {len(text)} characters, over the server's maximum of {max_seq_len}")
    ids = [inst.char_to_id.get(c, -1) for c in text]
    if -1 in ids:
        missing = list(dict.fromkeys(c for c, i in zip(text, ids) if i < 0))
        raise InvalidArgument(f"characters not in the vocabulary of model '{inst.name}': "
                              f"{', '.join(repr(c) for c in missing[:20])}"
                              f"{f' ... ({len(missing)} in all)' if len(missing) > 20 else ''}")
    return np.asarray(ids, dtype=np.int64)


def check_top_k(top_k: int, max_top_k: int) -> int:
    if not _is_int(top_k) or not 0 <= top_k <= max_top_k:
        raise InvalidArgument(f"top_k must be an integer in 0..{max_top_k}, got {top_k!r}")
    return int(top_k)


def check_generate_args(max_tokens: int, temperature: float, top_k: int, top_p: float, seed,
                        stop: Sequence[str], max_generate_tokens: int) -> None:
    if not _is_int(max_tokens) or not 1 <= max_tokens <= max_generate_tokens:
        raise InvalidArgument(f"max_tokens must be in 1..{max_generate_tokens}, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise InvalidArgument(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise InvalidArgument(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise InvalidArgument(f"stop must be a list of non-empty strings, got {quoted(stop)}")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop has {len(stop)} strings, over the limit of {MAX_STOP_STRINGS}")
    if sum(len(s) for s in stop) > MAX_STOP_CHARS:
        raise InvalidArgument(f"the stop strings have {sum(len(s) for s in stop)} characters in all, "
                              f"over the limit of {MAX_STOP_CHARS}")
