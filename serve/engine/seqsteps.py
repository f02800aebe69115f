"""What the SequenceManager (serve/engine/sequences.py) queues and keeps: a step of one
sequence (Step), a live sequence (Seq), the rule that decides what becomes of a step by
its id (verdict_of: run, replay, reload or refuse), and the rows of a many-sequence request
run as one unit (RowUnit), with the array work a unit needs: its rows' states stacked into one
run and split back, a row's inputs or outputs, and its rows' answers gathered.

A RowUnit is one Step per row, each queued on its own sequence like any step, so the
per-step rules (order, step ids, the state store, END) see them. When every row's
sequence has reached its step and each step is to run now, the unit runs as one Work:
the request's inputs as they are, the rows' states stacked along each state's batch
axis; its answer is the run's outputs. Otherwise the unit is dissolved: each row runs
as a step of its own (row i of the inputs), and the answer is gathered row by row.
"""
from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from rnnserve.serve.engine.modelio import ModelIO
from rnnserve.serve.engine.promise import Promise
from rnnserve.serve.engine.statestore import Write
from rnnserve.serve.errors import FailedPrecondition, InvalidArgument, ServeError, quoted

States = tuple[np.ndarray, ...]


def digest(arrays: Sequence[np.ndarray]) -> str:
    """A step's inputs, in short: a repeated step id must come with the same inputs."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).data)   # hashed in place, not copied
    return h.hexdigest()


@dataclass(eq=False, slots=True)
class Step:
    inputs: dict[str, np.ndarray]        # a unit's row: filled in only if it runs alone
    start: bool
    end: bool
    client_states: States | None
    deadline: float | None
    is_cancelled: Callable[[], bool] | None
    step_id: int | None = None           # the client's id for this step, if it sent one
    key: Hashable = None                 # its sequence's id
    digest: str = ""
    promise: Future | None = None        # its answer; a unit's row gets one only to be answered alone
    applied_id: int = 0                  # the id it runs as (set when dispatched)
    expect: str = "*"                    # the store token its state came from ('*' = a START)
    write: Write | None = None           # its write-through (shared store), set before it is answered
    reloaded: bool = False               # the sequence was reloaded from the store for it once
    rows: int = 1                        # its batch size
    unit: RowUnit | None = None          # the many-sequence request it is a row of
    row: int = 0                         # its row there
    arrived: bool = False                # its sequence has reached it and waits for the unit's other rows
    keep: Collection[str] | None = None  # the outputs its request reads (None: all); the states always

    @property
    def future(self) -> Future:
        assert self.promise is not None, "a unit's row is answered alone only once it has a Future"
        return self.promise


@dataclass(eq=False, slots=True)
class Seq:
    key: Hashable
    batch: int
    state: States | None = None          # None = the zero state
    pending: collections.deque[Step] = field(default_factory=collections.deque)
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    step: int = 0                        # id of the last applied step
    answer: dict[str, np.ndarray] | None = None   # its outputs, kept when it carried an id
    digest: str = ""
    token: str = "*"                     # the store's token for the state held here
    ended: bool = False                  # loaded as ended: only a repeat of its END is answered
    loading: bool = False                # not known here yet: being loaded from the store


@dataclass(eq=False)
class RowUnit:
    """The rows of one many-sequence request: row i is steps[i] of seqs[i]."""
    inputs: dict[str, np.ndarray]
    deadline: float | None
    is_cancelled: Callable[[], bool] | None
    steps: list[Step] = field(default_factory=list)
    seqs: list[Seq] = field(default_factory=list)
    waiting: int = 0                     # rows whose sequence has not reached the unit's step yet
    dissolved: bool = False              # its rows run as steps of their own
    states: list[States] | None = None   # each row's new state, once split (by the store's write-through)
    keep: Collection[str] | None = None  # the outputs its request reads (None: all); the states always
    future: Future = field(default_factory=Promise)   # the request's outputs


def verdict_of(seq: Seq, step: Step, shared: bool) -> str | ServeError:
    """(Under the SequenceManager's lock) 'run', 'replay', 'reload' or the error for the
    sequence's next step, by its step id (sets the id it runs as). shared: the state store is
    shared, so a copy held here may be stale."""
    if step.start:
        if (step.step_id is not None and not seq.ended and seq.answer is not None
                and seq.step == step.step_id and seq.digest == step.digest and seq.state is not None):
            return _replay(seq, step)   # a repeated START: running it again would give the same
        step.applied_id = 0 if step.step_id is None else step.step_id
        return "run"
    want = seq.step + 1
    sid = want if step.step_id is None else step.step_id
    repeat = sid == seq.step and seq.answer is not None and seq.digest == step.digest
    if repeat:
        return _replay(seq, step)
    if sid == want and not seq.ended:
        if step.rows != seq.batch:
            return batch_mismatch(seq, step.rows)
        step.applied_id = sid
        return "run"
    if shared and not step.reloaded:
        return "reload"   # this copy may be stale: another replica may have moved it on
    if seq.ended:
        return InvalidArgument(f"sequence {quoted(seq.key)} has ended (sequence_end): "
                               "its next request must set sequence_start=true (START is required)")
    if sid == seq.step:
        why = ("with other inputs" if seq.answer is not None
               else "and its answer was not kept (its request carried no step id)")
        return FailedPrecondition(f"sequence {quoted(seq.key)}: step {sid} was already applied {why}; "
                                  f"the server expects step {want}")
    return FailedPrecondition(f"sequence {quoted(seq.key)}: got step {sid}, the server expects step {want} "
                              f"(step {seq.step} is the last applied; repeat it to get its answer again)")


def kept(io: ModelIO, step: Step, out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What of a step's outputs is kept as its answer for a retry: what its request reads, and
    the states (not outputs it never reads: the logits of a request for the state alone)."""
    if step.keep is None:
        return dict(out)
    return {k: v for k, v in out.items() if k in step.keep or k in io.state_outputs}


def _replay(seq: Seq, step: Step) -> str | ServeError:
    missing = [name for name in step.keep or () if name not in (seq.answer or {})]
    if not missing:
        return "replay"
    return FailedPrecondition(f"sequence {quoted(seq.key)}: step {seq.step} was already applied; its kept "
                              f"answer holds the outputs its request read ({', '.join(sorted(seq.answer or {}))}), "
                              f"not {', '.join(missing)}: repeat it with the same outputs")


def batch_mismatch(seq: Seq, rows: int) -> InvalidArgument:
    return InvalidArgument(f"sequence {quoted(seq.key)} started with batch {seq.batch}; this request has batch {rows}")


def _rows(a: np.ndarray, axis: int | None, i: int) -> np.ndarray:
    return a if axis is None else a[(slice(None),) * axis + (slice(i, i + 1),)]


def row_inputs(io: ModelIO, inputs: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Row i of a unit's inputs (unbatched inputs whole)."""
    return {t.name: _rows(inputs[t.name], t.batch_axis, i) for t in io.inputs}


def _output_axes(io: ModelIO) -> dict[str, int | None]:
    return {**{t.name: t.batch_axis for t in io.outputs}, **{s.output: s.batch_axis for s in io.states}}


def row_outputs(io: ModelIO, out: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Row i of a unit's outputs."""
    axes = _output_axes(io)
    return {name: _rows(a, axes.get(name), i) for name, a in out.items()}


def stack_states(io: ModelIO, states: Sequence[States | None], zeros: Callable[[int], States]) -> States:
    """The rows' states (None = the zero state) stacked along each state's batch axis."""
    if all(s is None for s in states):
        return zeros(len(states))
    zero = zeros(1)
    return tuple(np.concatenate([zero[j] if s is None else s[j] for s in states], axis=pair.batch_axis)
                 for j, pair in enumerate(io.states))


def split_states(io: ModelIO, out: Mapping[str, np.ndarray]) -> list[States]:
    """Each row's state outputs of a unit's run, as arrays of its own (a sequence that keeps
    its state must not hold the whole run's memory)."""
    per_state = []
    for s in io.states:
        a = out[s.output]
        shape = list(a.shape)
        n, shape[s.batch_axis] = shape[s.batch_axis], 1
        # batch axis first, once; a row is then one contiguous block, in the state's own layout
        per_state.append(np.ascontiguousarray(np.moveaxis(a, s.batch_axis, 0)).reshape((n, *shape)))
    return list(zip(*[[row.copy() for row in rows] for rows in per_state]))


def gather(io: ModelIO, futures: Sequence[Future], into: Future) -> None:
    """Complete `into` with every row's outputs (futures[i] = row i's) stacked along each
    output's batch axis, or with the first failing row's error (naming the row)."""
    axes = _output_axes(io)
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
            into.set_exception(exc if str(exc).startswith("row ") or not isinstance(exc, ServeError)
                               else type(exc)(f"row {i}: {exc}"))
            return
        outs = [f.result() for f in futures]
        into.set_result({name: np.concatenate([o[name] for o in outs], axis=axes.get(name) or 0)
                         for name in outs[0]})

    for fut in futures:
        fut.add_done_callback(one_done)
