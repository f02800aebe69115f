"""A recurrent model described by its tensors: the generalized model contract.

docs/design.md ("Model contract") is the reference. A ModelSpec lists:
- the model's inputs and outputs other than state: name, dtype, shape, the batch axis of
  each (None = not batched, e.g. a scalar sample rate) and the time axis, if any;
- its state pairs: input name -> output name, with dtype, shape and the state's own batch
  axis ([layers, batch, hidden] has batch axis 1; [batch, ...] has 0);
- whether the batch is fixed (a graph whose batch dim is the constant 1 can be served
  with sequences, but never batched).

Shapes are tuples of int (a fixed size) or str (a symbolic, dynamic dim, e.g. "batch").
Our own char models are one case (serve derives their spec from the char metadata);
exported general models carry the spec as JSON under the metadata key `rnnserve.io`;
the server may also build one from a config.pbtxt or from the ONNX graph itself.
Pure Python (json only): both export and serve import it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# numpy dtype names a spec may use, with their Open Inference Protocol datatype strings.
DTYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}

Dim = int | str


class SpecError(ValueError):
    """A model description that does not add up; the message says what to declare."""


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str                      # numpy dtype name, a key of DTYPES
    shape: tuple[Dim, ...]
    batch_axis: int | None = 0      # None: not batched (the same value for every row)
    time_axis: int | None = None    # None: no time axis

    @property
    def datatype(self) -> str:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "batch_axis": self.batch_axis, "time_axis": self.time_axis}


@dataclass(frozen=True)
class StatePair:
    input: str
    output: str
    dtype: str
    shape: tuple[Dim, ...]          # includes the batch axis (a symbolic dim there)
    batch_axis: int

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of this state for `batch` rows (every other dim must be fixed)."""
        out = []
        for axis, d in enumerate(self.shape):
            if axis == self.batch_axis:
                out.append(batch)
            elif isinstance(d, int):
                out.append(d)
            else:
                raise SpecError(f"state {self.input!r}: dim {axis} ({d!r}) must be fixed; declare it in config.pbtxt")
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "dtype": self.dtype, "shape": list(self.shape),
                "batch_axis": self.batch_axis}


@dataclass(frozen=True)
class ModelSpec:
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    states: tuple[StatePair, ...] = ()
    fixed_batch: bool = False       # the graph's batch dim is the constant 1: never merge requests

    @property
    def streamable(self) -> bool:
        return bool(self.states)

    @property
    def state_inputs(self) -> list[str]:
        return [s.input for s in self.states]

    @property
    def state_outputs(self) -> list[str]:
        return [s.output for s in self.states]

    def input(self, name: str) -> TensorDecl:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def output(self, name: str) -> TensorDecl:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "states": [s.to_dict() for s in self.states], "fixed_batch": self.fixed_batch}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        if not isinstance(d, Mapping):
            raise SpecError("a model spec must be a JSON object")
        try:
            spec = cls(inputs=tuple(_tensor(t) for t in _list(d, "inputs")),
                       outputs=tuple(_tensor(t) for t in _list(d, "outputs")),
                       states=tuple(_state(s) for s in d.get("states", [])),
                       fixed_batch=bool(d.get("fixed_batch", False)))
        except (KeyError, TypeError) as e:
            raise SpecError(f"malformed model spec: {type(e).__name__}: {e}") from None
        spec.check()
        return spec

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"model spec is not valid JSON: {e}") from None

    def check(self) -> None:
        """Names unique, dtypes known, axes inside their shapes; raises SpecError."""
        names = [t.name for t in self.inputs] + [s.input for s in self.states]
        outs = [t.name for t in self.outputs] + [s.output for s in self.states]
        for group, what in ((names, "input"), (outs, "output")):
            dup = sorted({n for n in group if group.count(n) > 1})
            if dup:
                raise SpecError(f"{what} names repeat: {dup}")
        if not self.inputs:
            raise SpecError("a model needs at least one non-state input")
        if not self.outputs:
            raise SpecError("a model needs at least one non-state output")
        for t in self.inputs + self.outputs:
            _check_tensor(t.name, t.dtype, t.shape, t.batch_axis)
            if t.time_axis is not None and not 0 <= t.time_axis < len(t.shape):
                raise SpecError(f"{t.name!r}: time_axis {t.time_axis} is outside its shape {list(t.shape)}")
            if t.time_axis is not None and t.time_axis == t.batch_axis:
                raise SpecError(f"{t.name!r}: the time axis cannot be the batch axis")
        for s in self.states:
            _check_tensor(s.input, s.dtype, s.shape, s.batch_axis)


def _list(d: Mapping[str, Any], key: str) -> Sequence[Any]:
    v = d[key]
    if not isinstance(v, list):
        raise SpecError(f"model spec {key!r} must be a list")
    return v


def _shape(v: Any) -> tuple[Dim, ...]:
    if not isinstance(v, list) or not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in v):
        raise SpecError(f"a shape must be a list of ints and dim names, got {v!r}")
    return tuple(v)


def _tensor(t: Mapping[str, Any]) -> TensorDecl:
    return TensorDecl(name=str(t["name"]), dtype=str(t["dtype"]), shape=_shape(t["shape"]),
                      batch_axis=t.get("batch_axis", 0), time_axis=t.get("time_axis"))


def _state(s: Mapping[str, Any]) -> StatePair:
    return StatePair(input=str(s["input"]), output=str(s["output"]), dtype=str(s["dtype"]),
                     shape=_shape(s["shape"]), batch_axis=int(s["batch_axis"]))


def _check_tensor(name: str, dtype: str, shape: tuple[Dim, ...], batch_axis: int | None) -> None:
    if not name:
        raise SpecError("a tensor name must not be empty")
    if dtype not in DTYPES:
        raise SpecError(f"{name!r}: unsupported dtype {dtype!r} (one of {', '.join(DTYPES)})")
    for d in shape:
        if isinstance(d, int) and d < 0:
            raise SpecError(f"{name!r}: dims are sizes >= 0 or names, got {list(shape)}")
    if batch_axis is not None and not 0 <= batch_axis < len(shape):
        raise SpecError(f"{name!r}: batch_axis {batch_axis} is outside its shape {list(shape)}")
