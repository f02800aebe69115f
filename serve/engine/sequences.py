"""Stateful sequences: the recurrent state stays on the server.

Triton's semantics: a request with `sequence_id` and `sequence_start` begins
a sequence from the zero state (or from the state inputs the client sends);
later requests with the same id continue from the state the previous request
left (each state output becomes its pair's input: hn -> h0, hidden_out ->
hidden_in, ...); `sequence_end` frees it.

Each sequence runs its requests strictly in arrival order, one at a time, even
when a client pipelines them: a step is handed to the model's Batcher only
when the previous step of the same sequence has finished. Steps of *different*
sequences meet in the Batcher's queue and share onnxruntime runs (their states
are stacked along the batch axis and split back): continuous batching for
recurrent streams. A request carrying one step of many sequences, one per row,
is a unit of such steps, run as one Work when it can (serve/engine/sequence_units.py).

Idle sequences are freed after `idle_timeout_s`. At most `max_sequences` are
live; past that a START is refused with UNAVAILABLE and nothing is evicted.

Steps are numbered: the START is step s (its id, else 0) and each step after
it is the previous one plus one. A request may carry its step's id (the
`sequence_step` parameter or a numeric request `id`); a repeat of the last
applied step is answered from the kept answer (the outputs its request read,
and the state) without running it again, a
gap or an older id is refused with FAILED_PRECONDITION naming the step the
server expects (exactly once, for clients that retry). The state and the
last step live in the state store (serve/engine/statestore.py): with a
shared store a step for a sequence this process does not hold is loaded
from there, and each step's new state is written there before it is answered.
"""
from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Hashable
from concurrent.futures import Future

import numpy as np

from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.chunking import chunked
from rnnserve.serve.engine.modelio import ModelIO, Work
from rnnserve.serve.engine.promise import Promise
from rnnserve.serve.engine.seqsteps import (
    RowUnit,
    Seq,
    States,
    Step,
    batch_mismatch,
    digest,
    kept,
    row_inputs,
    split_states,
    verdict_of,
)
from rnnserve.serve.engine.sequence_units import RowUnits
from rnnserve.serve.engine.statestore import MemoryStore, SeqRecord, StateStore, Write
from rnnserve.serve.errors import FailedPrecondition, InvalidArgument, ServeError, Unavailable, quoted

log = logging.getLogger(__name__)


class SequenceManager(RowUnits):
    """Per-model registry of live sequences, feeding one Batcher."""

    def __init__(self, name: str, batcher: Batcher, io: ModelIO,
                 zero_state: Callable[[int], States], *, max_sequences: int = 4096,
                 idle_timeout_s: float = 60.0, store: StateStore | None = None,
                 model: str = "", version: str = "", max_run_bytes: int = 0) -> None:
        """max_run_bytes: a step whose run is estimated above it runs in time chunks (0: never)."""
        self.name = name
        self._batcher = batcher
        self._io = io
        self._zero_state = zero_state
        self.max_sequences = max_sequences
        self.idle_timeout_s = idle_timeout_s
        self._store: StateStore = store or MemoryStore()
        self._model, self._version = model or name, version
        self.max_run_bytes = max_run_bytes
        self._seqs: dict[Hashable, Seq] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.freed_idle = 0
        self._reaper = threading.Thread(target=self._reap_loop, name=f"seq-reaper-{name}", daemon=True)
        self._reaper.start()

    # ---- public -------------------------------------------------------------
    def submit(self, seq_id: Hashable, inputs: dict[str, np.ndarray], *, start: bool, end: bool,
               client_states: States | None = None, deadline: float | None = None,
               is_cancelled: Callable[[], bool] | None = None, step_id: int | None = None,
               outputs: Collection[str] | None = None) -> Future:
        """Queue one request of a sequence; the Future resolves to the model outputs. outputs: those
        the caller reads (None = all): a step in time chunks keeps only those and the states, and a
        step with an id keeps only those (and the states) as its answer for a retry."""
        self._check_streamable()
        if client_states and not start:
            raise InvalidArgument(f"state inputs ({', '.join(self._io.state_inputs)}) may only be sent with "
                                  "sequence_start: the server keeps the state of a live sequence")
        step = Step(inputs, start, end, client_states, deadline, is_cancelled, step_id, seq_id,
                    digest([*inputs.values(), *(client_states or ())]) if step_id is not None else "",
                    rows=self._io.rows(inputs), promise=Promise(), keep=outputs)
        with self._lock:
            refusal = self._refusal(seq_id, start, step.rows)
            if refusal is not None:
                raise refusal
            if seq_id not in self._seqs and len(self._seqs) >= self.max_sequences:
                raise self._full()
            seq, load = self._enqueue(step, time.monotonic())
            dispatch = not seq.busy
            if dispatch:
                seq.busy = True
        if load:
            self._load(seq)
        elif dispatch:
            self._dispatch(seq)
        return step.future

    def holds(self, seq_id: Hashable) -> bool:
        """The sequence is live in this process's memory."""
        with self._lock:
            return seq_id in self._seqs

    def stored_version(self, seq_id: Hashable) -> str | None:
        """The model version a shared store's record of the sequence names (None: no record, or
        no shared store). A blocking store read: for routing a step on the request's thread."""
        if not self._store.shared:
            return None
        rec = self._store.load(self._model, seq_id)
        return None if rec is None else rec.version

    def live(self) -> int:
        with self._lock:
            return len(self._seqs)

    def reap(self, now: float | None = None) -> int:
        """Free sequences idle longer than the timeout; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [k for k, s in self._seqs.items()
                    if not s.busy and not s.pending and now - s.last_used > self.idle_timeout_s]
            for k in idle:
                del self._seqs[k]
            self.freed_idle += len(idle)
        for k in idle:
            log.info("model %s: freed sequence %r after %.0f s idle", self.name, k, self.idle_timeout_s)
        return len(idle)

    def persist(self, items: list[Work], results: list[dict[str, np.ndarray]]) -> None:
        """Write-through (Batcher's before_answer): the new state of every sequence step in a
        finished run (each row of a unit), in one store commit, before any of them is answered."""
        writes = []
        for work, out in zip(items, results):
            tag = work.tag
            if isinstance(tag, Step):
                answer = ({k: v for k, v in kept(self._io, tag, out).items() if k not in self._io.state_outputs}
                          if tag.step_id is not None else None)
                writes.append(self._write(tag, int(work.rows), tuple(out[o] for o in self._io.state_outputs),
                                          answer))
            elif isinstance(tag, RowUnit):
                tag.states = split_states(self._io, out)    # _unit_finished keeps them
                writes += [self._write(step, 1, states, None) for step, states in zip(tag.steps, tag.states)]
        if writes:
            self._store.commit(self._model, writes, self.idle_timeout_s)

    def _write(self, step: Step, rows: int, states: States, answer: dict[str, np.ndarray] | None) -> Write:
        step.write = Write(step.key, step.expect, SeqRecord(
            self._model, self._version, rows, step.applied_id, dict(zip(self._io.state_inputs, states)),
            answer, step.digest, step.end))
        return step.write

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(2.0)

    # ---- internals ------------------------------------------------------------
    def _reap_loop(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout_s / 4))
        while not self._stop.wait(period):
            try:
                self.reap()
            except Exception:  # the reaper must survive anything
                log.exception("sequence reaper failed")

    def _load(self, seq: Seq) -> None:
        """Fetch the sequence's record from the store (off the caller's thread), then go on."""
        self._store.load_async(self._model, seq.key).add_done_callback(lambda f: self._loaded(seq, f))

    def _loaded(self, seq: Seq, fut: Future) -> None:
        try:
            rec: SeqRecord | None = fut.result()
            error = None
        except ServeError as e:
            rec, error = None, e
        except Exception as e:  # noqa: BLE001 - a corrupt record must not strand the steps
            log.exception("model %s: loading sequence %r failed", self.name, seq.key)
            rec, error = None, Unavailable(f"loading sequence {quoted(seq.key)} from the state store failed: {e}")
        with self._lock:
            if rec is not None and rec.version != self._version:
                error = FailedPrecondition(
                    f"sequence {quoted(seq.key)} started on version {rec.version} of model '{self._model}', "
                    f"this request reached version {self._version}: a sequence stays on its version; "
                    f"send its steps to version {rec.version} or start it again")
            elif rec is not None and not rec.ended and not self._fits(rec):
                error = FailedPrecondition(
                    f"sequence {quoted(seq.key)}: its stored state does not fit model '{self._model}' version "
                    f"{self._version} (the file was replaced since it started); start it again")
            elif rec is None and error is None and seq.loading:
                error = InvalidArgument(
                    f"sequence {quoted(seq.key)} is not active on model '{self.name}' (nor in the state store): "
                    "its first request must set sequence_start=true (START is required)")
            if error is not None and (seq.loading or seq.ended):
                failed, seq.pending = list(seq.pending), collections.deque()
                if self._seqs.get(seq.key) is seq:
                    del self._seqs[seq.key]
                seq.busy = False
            elif error is not None:   # a refresh failed: only the step that asked for it fails
                failed = [seq.pending.popleft()]
            else:
                failed = []
                if rec is not None:   # None: the store lost it (restarted empty); this copy goes on
                    seq.state = None if rec.ended else tuple(rec.states[n] for n in self._io.state_inputs)
                    seq.step, seq.digest = rec.step, rec.digest
                    seq.answer = None if rec.answer is None else {
                        **rec.answer, **{o: rec.states[i] for i, o in zip(self._io.state_inputs,
                                                                           self._io.state_outputs)}}
                    seq.token, seq.ended = rec.token, rec.ended
                    if seq.loading:
                        seq.batch = rec.batch
                seq.loading = False
        self._fail([(step, error) for step in failed if error is not None])
        self._dispatch(seq)

    def _fits(self, rec: SeqRecord) -> bool:
        zeros = self._zero_state(rec.batch)
        return all(n in rec.states and rec.states[n].shape == z.shape and rec.states[n].dtype == z.dtype
                   for n, z in zip(self._io.state_inputs, zeros))

    def _check_streamable(self) -> None:
        if not self._io.streamable:
            raise InvalidArgument(
                f"model '{self.name}' has no state inputs: it cannot carry state across requests, "
                "so sequence requests (sequence_id) are refused; send the whole sequence in one request")

    def _not_active(self, key: Hashable, where: str = "") -> InvalidArgument:
        return InvalidArgument(f"sequence {quoted(key)} is not active on model '{self.name}'{where}: "
                               "its first request must set sequence_start=true (START is required)")

    def _full(self) -> Unavailable:
        return Unavailable(f"model '{self.name}': too many live sequences ({self.max_sequences}); "
                           "end some sequences (sequence_end) or retry later")

    def _refusal(self, key: Hashable, start: bool, rows: int) -> ServeError | None:
        """(Under the lock) Why a step of `rows` rows is refused before it is queued, or None."""
        seq = self._seqs.get(key)
        if seq is None:
            return None if start or self._store.shared else self._not_active(key)
        if (not start or seq.pending or seq.busy) and rows != seq.batch and not seq.loading:
            return batch_mismatch(seq, rows)
        return None

    def _enqueue(self, step: Step, now: float) -> tuple[Seq, bool]:
        """(Under the lock, the step not refused) Queue the step on its sequence, a new one when it
        is not held here: -> (the sequence, whether it is to be loaded from the store)."""
        seq = self._seqs.get(step.key)
        load = False
        if seq is None:   # a START begins it, any other step loads it from the shared store
            load = not step.start
            seq = Seq(step.key, step.rows, loading=load, busy=load)
            self._seqs[step.key] = seq
        elif step.start and not seq.pending and not seq.busy:
            seq.batch = step.rows
        seq.pending.append(step)
        seq.last_used = now
        return seq, load

    def _start_state(self, seq: Seq, step: Step) -> States | None:
        """(Under the lock, the step to run) The state it starts from (None: zeros), and the store
        token that state came from."""
        step.expect = "*" if step.start else seq.token
        return step.client_states if step.start else seq.state

    def _release(self, seq: Seq) -> None:
        """(Under the lock, nothing pending) The sequence is free; freed if it was loaded as ended."""
        seq.busy = False
        if seq.ended and self._seqs.get(seq.key) is seq:
            del self._seqs[seq.key]

    def _dispatch(self, seq: Seq) -> None:
        """Hand the sequence's next step to the batcher (the sequence is marked busy); a unit's step
        waits there for the unit's other rows."""
        while True:
            with self._lock:
                if not seq.pending:
                    self._release(seq)
                    return
                step = seq.pending[0]
                unit = step.unit if step.unit is not None and not step.unit.dissolved else None
                if unit is not None:
                    ready = self._arrive(step)
                    claim = self._claim(unit) if ready else None
                else:
                    verdict = verdict_of(seq, step, self._store.shared)
                    if verdict == "reload":
                        step.reloaded = True
                    else:
                        seq.pending.popleft()
                    if verdict == "run":
                        state = self._start_state(seq, step)
                    answer = seq.answer
            if unit is not None:
                if ready:
                    self._launch(unit, claim)
                return
            if verdict == "reload":
                self._load(seq)
                return
            if verdict == "replay":
                step.future.set_result(dict(answer or {}))
                continue
            if isinstance(verdict, ServeError):
                step.future.set_exception(verdict)
                continue
            work = Work(step.inputs, state or self._zero_state(step.rows), need_state=True,
                        deadline=step.deadline, is_cancelled=step.is_cancelled, tag=step)
            try:
                fut = self._run(work, step.keep)
            except ServeError as e:
                step.future.set_exception(e)
                continue
            fut.add_done_callback(functools.partial(self._finished, seq, step))
            return

    def _run(self, work: Work, keep: Collection[str] | None) -> Future:
        """Queue a step's (or a unit's) Work on the Batcher: whole, or in time chunks past
        max_run_bytes (serve/engine/chunking.py: the write-through sees only the whole step);
        -> the future of its whole outputs. Raises what Batcher.submit raises."""
        chain = chunked(self._batcher.submit, self._io, work, self.max_run_bytes, keep)
        return self._batcher.submit(work) if chain is None else chain.start()

    def _finished(self, seq: Seq, step: Step, fut: Future) -> None:
        exc = fut.exception()
        out = fut.result() if exc is None else None
        # The Batcher hands each item its own state arrays (ModelIO.split), so keeping them
        # holds no other row's memory.
        state = None if out is None or step.end else tuple(out[n] for n in self._io.state_outputs)
        with self._lock:
            requeued, exc, dropped = self._apply(seq, step, exc, state, out, time.monotonic())
        if requeued:
            self._load(seq)
            return
        self._fail(dropped)
        if exc is None:
            step.future.set_result(out)
        else:
            step.future.set_exception(exc)
        self._dispatch(seq)

    def _apply(self, seq: Seq, step: Step, exc: BaseException | None, state: States | None,
               out: dict[str, np.ndarray] | None, now: float
               ) -> tuple[bool, BaseException | None, list[tuple[Step, BaseException]]]:
        """(Under the lock) A finished run of the step: its new state (None after END) or its error
        -> (queued again, to run after a reload; the step's error; the pending steps an END drops)."""
        written = step.write
        if exc is None and written is not None and written.error is not None:
            exc = written.error       # not stored: not applied, so a retry runs it again
        seq.last_used = now
        if exc is None and written is not None and not written.written:
            # another replica moved the sequence on: reload, then this step again, alone
            step.reloaded, step.write = False, None
            if step.unit is not None:
                step.inputs, step.unit = row_inputs(self._io, step.unit.inputs, step.row), None
                step.promise = Promise()
            seq.pending.appendleft(step)
            return True, None, []
        dropped: list[tuple[Step, BaseException]] = []
        if exc is None:
            seq.step, seq.digest, seq.ended = step.applied_id, step.digest, False
            seq.answer = ({k: np.array(v) for k, v in kept(self._io, step, out).items()}
                          if step.step_id is not None and out is not None else None)
            seq.token = written.record.token if written is not None else "*"
            if step.start:
                seq.batch = step.rows
            if step.end:
                if self._seqs.get(seq.key) is seq:
                    del self._seqs[seq.key]
                seq.state = None
                ended = InvalidArgument(f"sequence {quoted(seq.key)} ended (sequence_end) before this request ran")
                dropped, seq.pending = [(d, ended) for d in seq.pending], collections.deque()
            else:
                seq.state = state
        elif step.start:
            seq.state = None
        return False, exc, dropped
