"""ModelEngine: the Batcher and SequenceManager in front of one loaded ModelInstance.

Every onnxruntime run the data plane makes for a request goes through here
(warm-up alone calls ModelInstance.run directly): stateless tensors, sequence
steps, text predict/score, every generate step and every text-stream chunk.
Concurrent work of one model therefore shares onnxruntime runs.

The engine owns its ModelInstance (`inst`) and the version's statistics
(`counters`, serve/stats.py): its Batcher reports every run there.

Lifecycle: the repository creates one engine per loaded version and retires it
on unload or reload. Retiring lets in-flight work (a queued request, a generate
stream, an open text stream) finish on the old version; the scheduler and
reaper threads are closed when the last of it is done.

Waiting never blocks forever: `wait()` polls so a cancelled call is taken out
of the queue, a passed deadline frees its slot early, and nothing waits longer
than WAIT_LIMIT_S.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future

import numpy as np

from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.chunking import chunked
from rnnserve.serve.engine.modelio import Work
from rnnserve.serve.engine.runtime import ModelInstance
from rnnserve.serve.engine.sequences import SequenceManager
from rnnserve.serve.engine.statestore import shared_store
from rnnserve.serve.errors import Cancelled, DeadlineExceeded, InvalidArgument, Unavailable
from rnnserve.serve.settings import ServeSettings
from rnnserve.serve.stats import ModelCounters

log = logging.getLogger(__name__)

States = tuple[np.ndarray, ...]
POLL_S = 0.05            # how often a waiting caller checks cancellation and its deadline
RETIRE_GRACE_S = 2.0     # a retired engine stays open at least this long (see retire())
WAIT_LIMIT_S = 600.0     # the longest any caller waits for one run


class ModelEngine:
    """Batching, sequences and in-flight accounting for one model version."""

    def __init__(self, inst: ModelInstance, settings: ServeSettings, metrics=None):
        """metrics: the server's serve.metrics.Metrics (with --metrics-port), else None."""
        self.inst = inst
        self.settings = settings          # in force for this model (config.pbtxt overrides applied)
        self.counters = ModelCounters(inst.name, inst.version,
                                      metrics.model(inst.name, inst.version) if metrics is not None else None)
        self.io = inst.io
        label = f"{inst.name}:{inst.version}" if inst.version else inst.name
        store = shared_store(settings.state_store) if inst.streamable else None
        self.sequences: SequenceManager | None = None
        self.batcher = Batcher(label, inst.run, self.io, max_batch_size=settings.max_batch_size,
                               max_queue_delay_us=settings.max_queue_delay_us,
                               max_queue_size=settings.max_queue_size, instances=settings.instances,
                               inline_run_us=settings.inline_run_us,
                               on_run=self.counters.record_run,
                               before_answer=self._write_through if store and store.shared else None,
                               run_lone=None if inst.lone_session is None else functools.partial(inst.run, lone=True),
                               run_wide=None if inst.wide_session is None else functools.partial(inst.run, wide=True))
        if inst.streamable:
            self.sequences = SequenceManager(label, self.batcher, self.io, self.zero_states,
                                             max_sequences=settings.max_sequences,
                                             idle_timeout_s=settings.sequence_idle_timeout_s,
                                             store=store, model=inst.name, version=inst.version,
                                             max_run_bytes=settings.max_run_bytes)
        self.max_sequences = settings.max_sequences
        self._lock = threading.Lock()
        self._inflight = 0
        self._text_streams = 0
        self._retired = False
        self._retire_after = 0.0      # time.monotonic() before which a retired engine stays open
        self._closed = False
        self._on_done = self._done    # one bound method for every future, not one per submit

    # -- states ------------------------------------------------------------------------------
    def zero_states(self, batch: int) -> States:
        return self.inst.zero_states(batch)

    def states_from(self, feeds: Mapping[str, np.ndarray], batch: int) -> States:
        """The state tuple in input order from validated feeds; missing states are zeros."""
        names = self.io.state_inputs
        zeros = self.inst.zero_states(batch)
        if feeds.keys().isdisjoint(names):
            return zeros
        return tuple(feeds[n] if n in feeds else z for n, z in zip(names, zeros))

    def inputs_of(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The non-state inputs of validated feeds."""
        return {t.name: feeds[t.name] for t in self.io.inputs}

    def _write_through(self, items: list[Work], results: list[dict[str, np.ndarray]]) -> None:
        if self.sequences is not None:
            self.sequences.persist(items, results)

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, inputs: dict[str, np.ndarray], states: States, need_state: bool,
               deadline: float | None = None,
               is_cancelled: Callable[[], bool] | None = None,
               inline: bool = False, outputs: Collection[str] | None = None) -> tuple[Future, Callable[[], bool]]:
        """Queue stateless rows; returns (future of the outputs, cancel). Raises Unavailable (queue full).
        inline: the caller will block on the result, so it may run the work itself when idle.
        outputs: the non-state outputs the caller reads (None = all); a run too large for
        settings.max_run_bytes goes in time chunks (serve/engine/chunking.py), keeping only those."""
        work = Work(inputs, tuple(states), need_state=need_state, deadline=deadline, is_cancelled=is_cancelled)
        chain = chunked(self.batcher.submit, self.io, work, self.settings.max_run_bytes, outputs)
        if chain is not None:
            return self._tracked(chain.start), lambda: chain.cancel(self.batcher.cancel)
        return self._tracked(self.batcher.submit, work, inline), functools.partial(self.batcher.cancel, work)

    def submit_step(self, seq_id: Hashable, inputs: dict[str, np.ndarray], *, start: bool, end: bool,
                    client_states: States | None = None, deadline: float | None = None,
                    is_cancelled: Callable[[], bool] | None = None, step_id: int | None = None,
                    outputs: Collection[str] | None = None) -> Future:
        """Queue one request of a server-side sequence (Triton semantics, see serve/engine/sequences.py).
        outputs: those the caller reads (None = all); a long step runs in time chunks."""
        return self._tracked(self._sequences().submit, seq_id, inputs, start=start, end=end,
                             client_states=client_states or None, deadline=deadline,
                             is_cancelled=is_cancelled, step_id=step_id, outputs=outputs)

    def submit_rows(self, seq_ids: Sequence[Hashable], starts: Sequence[bool], ends: Sequence[bool],
                    inputs: dict[str, np.ndarray], deadline: float | None = None,
                    is_cancelled: Callable[[], bool] | None = None,
                    outputs: Collection[str] | None = None) -> Future:
        """Queue a request whose row i is a step of sequence seq_ids[i] (serve/engine/sequence_units.py)."""
        return self._tracked(self._sequences().submit_rows, seq_ids, starts, ends, inputs,
                             deadline=deadline, is_cancelled=is_cancelled, outputs=outputs)

    def _sequences(self) -> SequenceManager:
        if self.sequences is None:
            raise InvalidArgument(
                f"model '{self.inst.name}' {self.inst.stateless_why}: it cannot carry state across requests, so "
                "sequence requests (sequence_id) are refused; send the whole sequence in one request")
        return self.sequences

    def run(self, inputs: dict[str, np.ndarray], states: States, need_state: bool = True) -> dict[str, np.ndarray]:
        """Submit and wait: the blocking form the text API uses."""
        fut, cancel = self.submit(inputs, states, need_state, inline=True)
        return wait(fut, cancel)

    # -- accounting ----------------------------------------------------------------------------
    def _tracked(self, submit: Callable[..., Future], *args, **kwargs) -> Future:
        """submit(*args, **kwargs), its work counted in flight until its future completes."""
        self._acquire()
        try:
            fut = submit(*args, **kwargs)
        except BaseException:
            self._release()
            raise
        fut.add_done_callback(self._on_done)
        return fut

    def _done(self, _fut: Future) -> None:
        self._release()

    def _acquire(self) -> None:
        with self._lock:
            if self._closed:
                raise Unavailable(f"model '{self.inst.name}' version {self.inst.version} was unloaded; retry")
            self._inflight += 1

    def _release(self) -> None:
        with self._lock:
            self._inflight -= 1
            last = (self._retired and self._inflight == 0 and not self._closed
                    and time.monotonic() >= self._retire_after)
        if last:  # may run on the batcher thread, which cannot join itself
            threading.Thread(target=self.close, name=f"retire-{self.inst.name}", daemon=True).start()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the engine open for a multi-run request (a generate stream)."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def open_text_stream(self) -> None:
        """Count an open text stream against max_sequences; hold the engine until close_text_stream."""
        with self._lock:
            live = (self.sequences.live() if self.sequences else 0) + self._text_streams
            if live >= self.max_sequences:
                raise Unavailable(f"model '{self.inst.name}': too many live sequences ({self.max_sequences}); "
                                  "close some streams or retry later")
            self._text_streams += 1
        try:
            self._acquire()
        except Unavailable:
            with self._lock:
                self._text_streams -= 1
            raise

    def close_text_stream(self) -> None:
        with self._lock:
            self._text_streams -= 1
        self._release()

    def inflight(self) -> int:
        """Work queued or running here, plus open generate and text streams."""
        with self._lock:
            return self._inflight

    def live_sequences(self) -> int:
        """Live Triton-style sequences plus open text streams."""
        with self._lock:
            streams = self._text_streams
        return (self.sequences.live() if self.sequences else 0) + streams

    # -- lifecycle -----------------------------------------------------------------------------
    def retire(self, grace_s: float = RETIRE_GRACE_S) -> None:
        """No longer the serving version: close once the work in flight has finished, and not
        before `grace_s`. The grace covers a request that looked this version up just before it
        was replaced and has not queued its work yet: it still runs here instead of failing."""
        with self._lock:
            self._retired = True
            self._retire_after = time.monotonic() + grace_s
        timer = threading.Timer(grace_s, self._close_if_idle)
        timer.daemon = True
        timer.start()

    def _close_if_idle(self) -> None:
        with self._lock:
            idle = self._inflight == 0
        if idle:
            self.close()

    def close(self) -> None:
        """Stop the threads; queued work still runs first (the Batcher drains its queue)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.sequences is not None:
            self.sequences.close()
        self.batcher.close()
        stats = self.counters.snapshot()
        log.info("model %s version %s: batcher closed (%d executions, %d rows)", self.inst.name,
                 self.inst.version, stats.execution_count, stats.inference_count)

    @property
    def closed(self) -> bool:
        return self._closed


def wait(fut: Future, cancel: Callable[[], bool] | None = None,
         is_cancelled: Callable[[], bool] | None = None, deadline: float | None = None,
         limit_s: float = WAIT_LIMIT_S):
    """The future's result, polling so that a cancelled or expired request leaves the queue.

    cancel() removes the work if it is still queued (True) — the Batcher then fails
    its future with Cancelled. Work already running is waited for.
    """
    give_up = time.monotonic() + limit_s
    while True:
        try:
            return fut.result(timeout=POLL_S)
        except TimeoutError:
            pass
        now = time.monotonic()
        if is_cancelled is not None and is_cancelled():
            if cancel is not None:
                cancel()
            raise Cancelled("the request was cancelled by the client")
        if deadline is not None and now > deadline and cancel is not None and cancel():
            raise DeadlineExceeded("the request's deadline passed while it waited in the queue")
        if now > give_up:
            if cancel is not None:
                cancel()
            raise Unavailable(f"no result after {limit_s:.0f} s; the server is overloaded")
