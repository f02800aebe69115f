"""Stateful sequences: the recurrent state stays on the server.

Triton's semantics: a request with `sequence_id` and `sequence_start` begins
a sequence from the zero state (or from h0/c0 the client sends); later
requests with the same id continue from the state the previous request left
(`hn`/`cn` become the next `h0`/`c0`); `sequence_end` frees it.

Each sequence runs its requests strictly in arrival order, one at a time, even
when a client pipelines them: a step is handed to the model's Batcher only
when the previous step of the same sequence has finished. Steps of *different*
sequences meet in the Batcher's queue and share onnxruntime runs (their states
are stacked along the batch axis and split back): continuous batching for
recurrent streams.

Idle sequences are freed after `idle_timeout_s`. At most `max_sequences` are
live; past that a START is refused with UNAVAILABLE and nothing is evicted.
"""
from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from rnnserve.serve.engine.batching import Batcher, ModelIO, Work
from rnnserve.serve.errors import InvalidArgument, ServeError, Unavailable

log = logging.getLogger(__name__)

States = tuple[np.ndarray, ...]


@dataclass(eq=False)
class _Step:
    tokens: np.ndarray
    start: bool
    end: bool
    client_states: States | None
    deadline: float | None
    is_cancelled: Callable[[], bool] | None
    future: Future = field(default_factory=Future)


@dataclass(eq=False)
class _Seq:
    key: Hashable
    batch: int
    state: States | None = None          # None = the zero state
    pending: collections.deque[_Step] = field(default_factory=collections.deque)
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


class SequenceManager:
    """Per-model registry of live sequences, feeding one Batcher."""

    def __init__(self, name: str, batcher: Batcher, io: ModelIO,
                 zero_state: Callable[[int], States], *, max_sequences: int = 4096,
                 idle_timeout_s: float = 60.0) -> None:
        self.name = name
        self._batcher = batcher
        self._io = io
        self._zero_state = zero_state
        self.max_sequences = max_sequences
        self.idle_timeout_s = idle_timeout_s
        self._seqs: dict[Hashable, _Seq] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.freed_idle = 0
        self._reaper = threading.Thread(target=self._reap_loop, name=f"seq-reaper-{name}", daemon=True)
        self._reaper.start()

    # ---- public -------------------------------------------------------------
    def submit(self, seq_id: Hashable, tokens: np.ndarray, *, start: bool, end: bool,
               client_states: States | None = None, deadline: float | None = None,
               is_cancelled: Callable[[], bool] | None = None) -> Future:
        """Queue one request of a sequence; the Future resolves to the model outputs."""
        if not self._io.streamable:
            raise InvalidArgument(
                f"model '{self.name}' is bidirectional: it cannot carry state across requests, "
                "so sequence requests (sequence_id) are refused; send the whole sequence in one request")
        batch = int(tokens.shape[0])
        step = _Step(tokens, start, end, client_states, deadline, is_cancelled)
        with self._lock:
            seq = self._seqs.get(seq_id)
            if start:
                if seq is None:
                    if len(self._seqs) >= self.max_sequences:
                        raise Unavailable(
                            f"model '{self.name}': too many live sequences ({self.max_sequences}); "
                            "end some sequences (sequence_end) or retry later")
                    seq = _Seq(seq_id, batch)
                    self._seqs[seq_id] = seq
                elif not seq.pending and not seq.busy:
                    seq.batch = batch
            else:
                if seq is None:
                    raise InvalidArgument(
                        f"sequence {seq_id!r} is not active on model '{self.name}': "
                        "its first request must set sequence_start=true (START is required)")
                if client_states:
                    raise InvalidArgument(
                        f"state inputs ({', '.join(self._io.state_inputs)}) may only be sent with "
                        "sequence_start: the server keeps the state of a live sequence")
            if batch != seq.batch:
                raise InvalidArgument(
                    f"sequence {seq_id!r} started with batch {seq.batch}; this request has batch {batch}")
            seq.pending.append(step)
            seq.last_used = time.monotonic()
            dispatch = not seq.busy
            if dispatch:
                seq.busy = True
        if dispatch:
            self._dispatch(seq)
        return step.future

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

    def _dispatch(self, seq: _Seq) -> None:
        """Hand the sequence's next step to the batcher (the sequence is marked busy)."""
        while True:
            with self._lock:
                if not seq.pending:
                    seq.busy = False
                    return
                step = seq.pending.popleft()
                if step.start:
                    state = step.client_states or self._zero_state(seq.batch)
                else:
                    state = seq.state if seq.state is not None else self._zero_state(seq.batch)
            work = Work(step.tokens, tuple(state), need_state=True, deadline=step.deadline,
                        is_cancelled=step.is_cancelled)
            try:
                fut = self._batcher.submit(work)
            except ServeError as e:
                step.future.set_exception(e)
                continue
            fut.add_done_callback(functools.partial(self._finished, seq, step))
            return

    def _finished(self, seq: _Seq, step: _Step, fut: Future) -> None:
        exc = fut.exception()
        dropped: Sequence[_Step] = ()
        out = fut.result() if exc is None else None
        # The Batcher hands each item its own state arrays (Batcher._split), so keeping them
        # holds no other row's memory.
        state = None if out is None or step.end else tuple(out[n] for n in self._io.state_outputs)
        with self._lock:
            seq.last_used = time.monotonic()
            if exc is None:
                if step.end:
                    if self._seqs.get(seq.key) is seq:
                        del self._seqs[seq.key]
                    seq.state = None
                    dropped, seq.pending = list(seq.pending), collections.deque()
                else:
                    seq.state = state
            elif step.start:
                seq.state = None
        for d in dropped:
            d.future.set_exception(InvalidArgument(
                f"sequence {seq.key!r} ended (sequence_end) before this request ran"))
        if exc is None:
            step.future.set_result(fut.result())
        else:
            step.future.set_exception(exc)
        self._dispatch(seq)
