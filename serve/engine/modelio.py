"""What the batcher runs: Work (one caller's rows) and ModelIO, which knows where each tensor
of a model has its batch (and time) axis, so work can be merged into one onnxruntime run
and the run's outputs split back (rnnserve/modelspec.py describes the model).

Exactness rules (ModelIO says, per tensor, where its batch axis is):
- Work whose batched inputs have the same shapes apart from the batch axis, and
  whose unbatched inputs (a sample rate, say) have equal values, shares a run:
  every input and each state is stacked along its own batch axis ([2, batch, 128],
  [layers, batch, hidden], [batch, ...]) and split back along it. The recurrent
  ops treat batch rows independently, so each row's outputs and final state are
  its own.
- A model with a fixed batch of 1, or an output without a batch axis, never
  shares a run.
- Padding (`ModelIO.pad`, our unidirectional char models only): work whose
  caller does not need the final state may be right-padded along the time axis to
  the longest row: position t only depends on positions <= t, so the logits at
  the valid positions are unchanged; each row is sliced back to its own length.
  The final state at the padded end would be wrong, so work that needs the state
  is only grouped by exact length. Other models: exact shapes only (nothing says
  they are causal, or that 0 is a valid input).
- Time chunks (`ModelIO.chunkable`, serve/engine/chunking.py): a stateful model whose
  batched inputs and outputs all run along time may run a long request in slices of
  its time axis, each starting from the previous slice's final states.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from rnnserve.modelspec import ModelSpec, StatePair, TensorDecl
from rnnserve.serve.engine.promise import Promise


@dataclass(eq=False)  # identity: queued work is removed by identity
class Work:
    """Rows to run: the model's non-state inputs, and its states (in ModelIO.states order)."""
    inputs: dict[str, np.ndarray]
    states: tuple[np.ndarray, ...] = ()
    need_state: bool = True
    deadline: float | None = None                 # time.monotonic()
    is_cancelled: Callable[[], bool] | None = None
    tag: object = None                            # the submitter's own note (a sequence's step)
    # its split outputs -> its result, before before_answer sees it (a time chunk: ChunkedRun's)
    finish: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    future: Future = field(default_factory=Promise)
    enqueued: float = field(default_factory=time.monotonic)
    # set by ModelIO.sign (Batcher.submit), read often by the scheduler:
    rows: int = 1                        # size of the batch axis
    seq_len: int = 0                     # length of the time axis (padded models), else 0
    key: object = None                   # work with equal keys may share a run


def _take_rows(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    if axis == 0:   # the usual axes spelled out: this runs for every row of every run
        return a[start:stop]
    if axis == 1:
        return a[:, start:stop]
    return a[(slice(None),) * axis + (slice(start, stop),)]


def _padded(parts: list[np.ndarray], batch_axis: int, time_axis: int, max_len: int) -> np.ndarray:
    """Stack along the batch axis, right-padded along the time axis with zeros (valid ids for the
    padded models)."""
    shape = list(parts[0].shape)
    shape[batch_axis] = sum(p.shape[batch_axis] for p in parts)
    shape[time_axis] = max_len
    out = np.zeros(shape, parts[0].dtype)
    r = 0
    for p in parts:
        rows, length = p.shape[batch_axis], p.shape[time_axis]
        index = [slice(None)] * len(shape)
        index[batch_axis], index[time_axis] = slice(r, r + rows), slice(0, length)
        out[tuple(index)] = p
        r += rows
    return out


@dataclass(frozen=True)
class ModelIO:
    """What the batcher needs to merge work and split outputs: each tensor's batch (and time) axis."""
    inputs: tuple[TensorDecl, ...]          # non-state inputs
    outputs: tuple[TensorDecl, ...]         # non-state outputs
    states: tuple[StatePair, ...] = ()
    mergeable: bool = True                  # work may share a run
    pad: bool = False                       # right-padding along the time axis is exact (see above)

    # derived from the above (read on every request)
    state_inputs: tuple[str, ...] = field(init=False)
    state_outputs: tuple[str, ...] = field(init=False)
    streamable: bool = field(init=False)
    # a long run may be split along the time axis, carrying the states (serve/engine/chunking.py)
    chunkable: bool = field(init=False)
    _rows_from: tuple[str, int] | None = field(init=False)   # (first batched input, its batch axis)
    _time_from: tuple[str, int] | None = field(init=False)   # (first input with a time axis, that axis)
    # output name -> (bytes per row and step, batched, along time, rank), when its other dims are sizes
    _output_units: dict[str, tuple[int, bool, bool, int]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__   # frozen
        set_(self, "state_inputs", tuple(s.input for s in self.states))
        set_(self, "state_outputs", tuple(s.output for s in self.states))
        set_(self, "streamable", bool(self.states))
        set_(self, "_rows_from", next(((t.name, t.batch_axis) for t in self.inputs if t.batch_axis is not None),
                                      None))
        set_(self, "_time_from", next(((t.name, t.time_axis) for t in self.inputs if t.time_axis is not None),
                                      None))
        units = {}
        for t in self.outputs:
            other = [d for i, d in enumerate(t.shape) if i not in (t.batch_axis, t.time_axis)]
            if all(isinstance(d, int) for d in other):
                units[t.name] = (np.dtype(t.dtype).itemsize * math.prod(other), t.batch_axis is not None,
                                 t.time_axis is not None, len(t.shape))
        for st in self.states:
            other = [d for i, d in enumerate(st.shape) if i != st.batch_axis]
            if all(isinstance(d, int) for d in other):
                units[st.output] = (np.dtype(st.dtype).itemsize * math.prod(other), True, False, len(st.shape))
        set_(self, "_output_units", units)
        # Exact when every batched input and every output runs along time: the chunks' outputs
        # concatenate to the whole run's, and the last chunk's states are its final states.
        set_(self, "chunkable", bool(self.states) and self._time_from is not None
             and all(t.time_axis is not None for t in self.inputs if t.batch_axis is not None)
             and all(t.time_axis is not None for t in self.outputs))

    @classmethod
    def from_spec(cls, spec: ModelSpec, pad: bool = False) -> ModelIO:
        """Work may share a run unless the batch is fixed or an output cannot be split by rows."""
        mergeable = not spec.fixed_batch and all(t.batch_axis is not None for t in spec.outputs)
        return cls(tuple(spec.inputs), tuple(spec.outputs), tuple(spec.states), mergeable, pad)

    def rows(self, inputs: Mapping[str, np.ndarray]) -> int:
        """The batch size of validated inputs (1 when no input is batched)."""
        if self._rows_from is None:
            return 1
        name, axis = self._rows_from
        return int(inputs[name].shape[axis]) if name in inputs else 1

    def time_len(self, inputs: Mapping[str, np.ndarray]) -> int | None:
        """The length of the time axis of validated inputs (None when no input has one)."""
        if self._time_from is None or self._time_from[0] not in inputs:
            return None
        name, axis = self._time_from
        return int(inputs[name].shape[axis])

    def output_bytes(self, name: str, rows: int, steps: int | None) -> tuple[int, int] | None:
        """(bytes, rank) of output `name` (a state output too) from a run over `rows` rows and
        `steps` time steps; None when a dim other than the batch and time axes is not a size."""
        unit = self._output_units.get(name)
        if unit is None:
            return None
        nbytes, batched, timed, rank = unit
        length = 1
        if timed:
            if steps is None:
                return None
            length = steps
        return nbytes * (rows if batched else 1) * length, rank

    def time_slice(self, inputs: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        """Steps start..stop of every input with a time axis (contiguous, for onnxruntime); the
        others as they are."""
        return {t.name: (np.ascontiguousarray(_take_rows(inputs[t.name], t.time_axis, start, stop))
                         if t.time_axis is not None else inputs[t.name]) for t in self.inputs}

    def sign(self, w: Work) -> None:
        """Set w.rows, w.seq_len and w.key (its shapes apart from the batch axis, the time axis
        when padding is allowed, and the values of its unbatched inputs)."""
        key: list[object] = []
        w.rows, w.seq_len = self.rows(w.inputs), 0
        for t in self.inputs:
            a = w.inputs[t.name]
            if t.batch_axis is None:
                key.append((a.dtype.str, a.shape, a.tobytes()))
                continue
            shape = list(a.shape)
            shape[t.batch_axis] = -1
            if self.pad and t.time_axis is not None:
                w.seq_len = max(w.seq_len, shape[t.time_axis])
                shape[t.time_axis] = -1
            key.append(tuple(shape))
        w.key = tuple(key)

    def assemble(self, batch: list[Work]) -> dict[str, np.ndarray]:
        """The feeds of one run for the work of `batch` (compatible: see Batcher._compatible)."""
        if len(batch) == 1:
            w = batch[0]
            feeds = dict(w.inputs)
            feeds.update(zip(self.state_inputs, w.states))
            return feeds
        feeds = {}
        max_len = max(w.seq_len for w in batch)
        for t in self.inputs:
            parts = [w.inputs[t.name] for w in batch]
            if t.batch_axis is None:        # equal in every item (the key says so)
                feeds[t.name] = parts[0]
            elif self.pad and t.time_axis is not None and any(p.shape[t.time_axis] != max_len for p in parts):
                feeds[t.name] = _padded(parts, t.batch_axis, t.time_axis, max_len)
            else:
                feeds[t.name] = np.concatenate(parts, axis=t.batch_axis)
        for i, s in enumerate(self.states):
            feeds[s.input] = np.concatenate([w.states[i] for w in batch], axis=s.batch_axis)
        return feeds

    def split(self, batch: list[Work], out: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Each item's rows of the outputs. Outputs are views of the run's output; states are
        each item's own contiguous arrays, so a sequence keeping its state holds small arrays,
        not the whole run's output."""
        if len(batch) == 1:
            return [out]
        results = []
        r = 0
        for w in batch:
            res = {}
            for t in self.outputs:
                # every output has a batch axis here (ModelIO.mergeable)
                part = out[t.name] if t.batch_axis is None else _take_rows(out[t.name], t.batch_axis, r,
                                                                           r + w.rows)
                if self.pad and t.time_axis is not None:
                    part = _take_rows(part, t.time_axis, 0, w.seq_len)
                res[t.name] = part
            if w.need_state:  # exact: need_state work is only grouped by equal shapes
                for s in self.states:
                    # a copy: the item's own C-contiguous array, holding no other row's memory
                    res[s.output] = _take_rows(out[s.output], s.batch_axis, r, r + w.rows).copy()
            results.append(res)
            r += w.rows
        return results
