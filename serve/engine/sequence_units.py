"""The SequenceManager's many-sequence requests (serve/engine/sequences.py inherits RowUnits).

A request whose row i is a step of sequence keys[i] becomes a RowUnit: one Step per row,
each queued on its sequence like any other step, so the per-step rules stay the
manager's (order, step ids, the state store, END, the limits). The unit waits until
every row's sequence has reached its step (a free sequence at once, a busy one when its
earlier steps are done, pipelined units one after another). Then, when each step is to
run now (seqsteps.verdict_of says 'run'), the unit runs as one Work (a long one as a
chain of time chunks, serve/engine/chunking.py): the request's inputs as they are, the
rows' states stacked once. Finished, each row's new state goes
back to its sequence (one store commit for all rows, before the answer) and the answer
is the run's outputs. Otherwise (a replay, a reload, an error, a row dropped or failed
before it ran) the unit is dissolved: each row runs as a step of its own, and the answer
is gathered row by row (the first failing row fails it).
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.modelio import ModelIO, Work
from rnnserve.serve.engine.promise import Promise
from rnnserve.serve.engine.seqsteps import (
    RowUnit,
    Seq,
    States,
    Step,
    gather,
    row_inputs,
    row_outputs,
    split_states,
    stack_states,
    verdict_of,
)
from rnnserve.serve.engine.statestore import StateStore
from rnnserve.serve.errors import InvalidArgument, ServeError


class RowUnits:
    """Many-sequence requests, run as one unit when they can (see the module's docstring)."""

    # the SequenceManager's
    _lock: threading.Lock
    _seqs: dict[Hashable, Seq]
    _io: ModelIO
    _batcher: Batcher
    _store: StateStore
    _zero_state: Callable[[int], States]
    max_sequences: int

    if TYPE_CHECKING:
        def _check_streamable(self) -> None: ...
        def _refusal(self, key: Hashable, start: bool, rows: int) -> ServeError | None: ...
        def _full(self) -> ServeError: ...
        def _not_active(self, key: Hashable, where: str = "") -> InvalidArgument: ...
        def stored_version(self, seq_id: Hashable) -> str | None: ...
        def _enqueue(self, step: Step, now: float) -> tuple[Seq, bool]: ...
        def _load(self, seq: Seq) -> None: ...
        def _start_state(self, seq: Seq, step: Step) -> States | None: ...
        def _release(self, seq: Seq) -> None: ...
        def _dispatch(self, seq: Seq) -> None: ...
        def _run(self, work: Work, keep: Collection[str] | None) -> Future: ...
        def _apply(self, seq: Seq, step: Step, exc: BaseException | None, state: States | None,
                   out: dict[str, np.ndarray] | None, now: float
                   ) -> tuple[bool, BaseException | None, list[tuple[Step, BaseException]]]: ...

    def submit_rows(self, keys: Sequence[Hashable], starts: Sequence[bool], ends: Sequence[bool],
                    inputs: dict[str, np.ndarray], *, deadline: float | None = None,
                    is_cancelled: Callable[[], bool] | None = None,
                    outputs: Collection[str] | None = None) -> Future:
        """Queue a request whose row i is one step of sequence keys[i] (distinct) as a unit;
        -> a Future of its outputs, row i from sequence keys[i]. A row refused before anything is
        queued (a new id without START, a batch mismatch, too many sequences) refuses the
        whole request, naming the row, with nothing changed. outputs: the outputs the answer
        needs (None = all; a unit run in time chunks keeps only those, and the states)."""
        self._check_streamable()
        if len(set(keys)) < len(keys):   # a unit would wait for itself
            raise InvalidArgument("a sequence may have one row per request")
        if self._store.shared:
            self._check_stored(keys, starts)
        unit = RowUnit(inputs, deadline, is_cancelled, keep=outputs)
        unit.steps = [Step({}, start, end, None, deadline, is_cancelled, key=key, unit=unit, row=i, keep=outputs)
                      for i, (key, start, end) in enumerate(zip(keys, starts, ends))]
        loads: list[Seq] = []
        with self._lock:
            new = 0
            for i, (key, start) in enumerate(zip(keys, starts)):
                refusal = self._refusal(key, start, 1)
                if refusal is not None:
                    raise type(refusal)(f"row {i}: {refusal}")
                new += key not in self._seqs
            if new and len(self._seqs) + new > self.max_sequences:
                raise self._full()
            now = time.monotonic()
            for step in unit.steps:
                seq, load = self._enqueue(step, now)
                if load:
                    loads.append(seq)
                elif not seq.busy:     # free: it has reached the unit's step
                    seq.busy = step.arrived = True
                unit.seqs.append(seq)
            unit.waiting = sum(not step.arrived for step in unit.steps)
            ready = unit.waiting == 0
            claim = self._claim(unit) if ready else None
        for seq in loads:
            self._load(seq)
        if ready:
            self._launch(unit, claim)
        return unit.future

    def _check_stored(self, keys: Sequence[Hashable], starts: Sequence[bool]) -> None:
        """Refuse a unit whose row continues a sequence that is neither here nor in the shared
        store (blocking store reads, before anything is queued)."""
        with self._lock:
            missing = [(i, key) for i, (key, start) in enumerate(zip(keys, starts))
                       if not start and key not in self._seqs]
        for i, key in missing:
            if self.stored_version(key) is None:
                raise InvalidArgument(f"row {i}: {self._not_active(key, ' (nor in the state store)')}")

    def _arrive(self, step: Step) -> bool:
        """(Under the lock) The step's sequence has reached it: True when the unit's last row did."""
        if step.arrived or step.unit is None:
            return False
        step.arrived = True
        step.unit.waiting -= 1
        return step.unit.waiting == 0

    def _claim(self, unit: RowUnit) -> list[States | None] | None:
        """(Under the lock, every row at its step) Take each row's step off its sequence with the
        state it starts from, when every step is to run now; else dissolve the unit (None)."""
        if any(verdict_of(seq, step, self._store.shared) != "run" for seq, step in zip(unit.seqs, unit.steps)):
            self._dissolve(unit)
            return None
        for seq in unit.seqs:
            seq.pending.popleft()
        return [self._start_state(seq, step) for seq, step in zip(unit.seqs, unit.steps)]

    def _dissolve(self, unit: RowUnit) -> list[Seq]:
        """(Under the lock) Let the unit's rows run as steps of their own: -> the sequences
        waiting at it (to dispatch); the caller gathers the answer."""
        unit.dissolved = True
        for step in unit.steps:
            step.inputs, step.promise = row_inputs(self._io, unit.inputs, step.row), Promise()
        return [seq for seq, step in zip(unit.seqs, unit.steps) if step.arrived and seq.pending
                and seq.pending[0] is step]

    def _launch(self, unit: RowUnit, claim: list[States | None] | None) -> None:
        """Run a claimed unit as one Work, or a dissolved one row by row."""
        if claim is None:
            gather(self._io, [step.future for step in unit.steps], unit.future)
            self._dispatch_each(unit.seqs)
            return
        work = Work(unit.inputs, stack_states(self._io, claim, self._zero_state), need_state=True,
                    deadline=unit.deadline, is_cancelled=unit.is_cancelled, tag=unit)
        try:
            fut = self._run(work, unit.keep)
        except ServeError as e:
            unit.future.set_exception(e)
            self._dispatch_each(unit.seqs)
            return
        fut.add_done_callback(functools.partial(self._unit_finished, unit))

    def _unit_finished(self, unit: RowUnit, fut: Future) -> None:
        """Each row's outcome to its sequence (SequenceManager._apply), under one lock; the next
        units of those sequences are launched before this one is answered."""
        exc = fut.exception()
        out = fut.result() if exc is None else None
        # the rows' own copies (the store's write-through split them already)
        states = unit.states if unit.states is not None or out is None else split_states(self._io, out)
        outcomes: list[tuple[bool, BaseException | None]] = []
        dropped: list[tuple[Step, BaseException]] = []
        reload, dispatch, launch = [], [], []
        with self._lock:
            now = time.monotonic()
            for i, (seq, step) in enumerate(zip(unit.seqs, unit.steps)):
                state = None if states is None or step.end else states[i]
                requeued, error, ended = self._apply(seq, step, exc, state, None, now)
                outcomes.append((requeued, error))
                dropped += ended
                if requeued:
                    reload.append(seq)
                elif not seq.pending:
                    self._release(seq)
                elif (head := seq.pending[0]).unit is None or head.unit.dissolved:
                    dispatch.append(seq)
                elif self._arrive(head):
                    launch.append((head.unit, self._claim(head.unit)))
        for next_unit, claim in launch:
            self._launch(next_unit, claim)
        if exc is not None:
            unit.future.set_exception(exc)
        elif all(not requeued and error is None for requeued, error in outcomes):
            unit.future.set_result(out)
        else:   # some rows failed or run again: the answer row by row
            for i, (step, (requeued, error)) in enumerate(zip(unit.steps, outcomes)):
                if not requeued:   # a requeued row got its Future (SequenceManager._apply)
                    step.promise = Promise()
                if error is not None:
                    step.future.set_exception(error)
                elif not requeued and out is not None:
                    step.future.set_result(row_outputs(self._io, out, i))
            gather(self._io, [step.future for step in unit.steps], unit.future)
        self._fail(dropped)
        for seq in reload:
            self._load(seq)
        self._dispatch_each(dispatch)

    def _fail(self, failed: list[tuple[Step, BaseException]]) -> None:
        """Fail steps that will not run; a unit that loses a row runs its other rows alone."""
        if not failed:   # the usual case, on every finished step: no batcher hold for nothing
            return
        units = {step.unit for step, _ in failed if step.unit is not None}
        waiting: list[Seq] = []
        if units:
            with self._lock:
                units = {unit for unit in units if not unit.dissolved}
                for unit in units:
                    waiting += self._dissolve(unit)
            for unit in units:
                gather(self._io, [step.future for step in unit.steps], unit.future)
        for step, error in failed:
            step.future.set_exception(error)
        self._dispatch_each(waiting)

    def _dispatch_each(self, seqs: Sequence[Seq]) -> None:
        with self._batcher.together():   # rows dispatched together share a run
            for seq in seqs:
                self._dispatch(seq)
