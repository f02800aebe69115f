"""Dynamic batching for one model: concurrent work shares one onnxruntime run.

A scheduler thread per model takes what is queued, forms a batch of rows that
can share a run *exactly*, runs it, and splits the outputs back. With
`instances` > 1 (Triton's instance count) that many scheduler threads each run
their own batch at once.

Exactness: which work may share a run, and how tensors are stacked and split, is
ModelIO's (serve/engine/modelio.py).

Latency: the scheduler never waits for a batch that cannot fill. It runs
whatever is queued the moment it is free. Only after an idle spell (nothing
queued up while it ran) does it wait, at most `max_queue_delay_us`, and only
while the batch is smaller than the largest batch of the last few runs, i.e.
when recent traffic shows that more callers are about to arrive. At
concurrency 1 recent batches hold one row, so a request runs as soon as it
arrives; under steady load the work that queued during a run goes the moment
the run ends (waiting then would only leave the model idle).

Lone and wide runs: a batch may run on another session of the model, with more threads
(serve/engine/runkinds.py has the rules, and the estimate of quick runs, below).

Threads: a caller that is about to block (inline) runs its own work when the model
is idle and the last runs held a single row each, so concurrency 1 has no hand-off.
The event loop, ending a hold (release(here=True)), runs the next batch itself when
it is quick (`inline_run_us`; streamed one-token steps): the hand-offs to a scheduler
and back cost more CPU than such a run. Otherwise the scheduler runs it; a finished
run goes to the batcher's completion thread, which splits the outputs, records
statistics and completes the callers' futures while the scheduler starts the next run
(waking callers first would have them contend for the GIL with the next batch's
assembly and leave the model idle). The completion thread takes every run that
finished meanwhile at once; a `before_answer` hook (the state store's write-through)
is called once for all of them before any caller is answered: one round trip for a
run, or fewer.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np

from rnnserve.serve.engine import runkinds
from rnnserve.serve.engine.modelio import ModelIO, Work
from rnnserve.serve.errors import Cancelled, DeadlineExceeded, Unavailable
from rnnserve.serve.stats import RunRecord

log = logging.getLogger(__name__)

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

class _Group:
    """The batch being formed: its rows, lengths and whether any item needs hn/cn."""

    def __init__(self, first: Work) -> None:
        self.items: list[Work] = []
        self.key = first.key
        self.rows = self.real = 0
        self.min_len = self.max_len = first.seq_len
        self.need_state = False
        self.add(first)

    def add(self, w: Work) -> None:
        self.items.append(w)
        self.rows += w.rows
        self.real += w.rows * w.seq_len
        self.min_len = min(self.min_len, w.seq_len)
        self.max_len = max(self.max_len, w.seq_len)
        self.need_state = self.need_state or w.need_state


class Batcher:
    """One scheduler thread that merges queued Work into onnxruntime runs."""

    def __init__(self, name: str, run: RunFn, io: ModelIO, *, max_batch_size: int = 32,
                 max_queue_delay_us: int = 500, max_queue_size: int = 1024,
                 max_padding_ratio: float = 2.0, instances: int = 1,
                 on_run: Callable[[RunRecord], None] | None = None,
                 before_answer: Callable[[list[Work], list[dict[str, np.ndarray]]], None] | None = None,
                 run_lone: RunFn | None = None, run_wide: RunFn | None = None, inline_run_us: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self.name = name
        self._run = run
        self._run_lone = run_lone   # lone runs (see the module's docstring); None: none
        self._run_wide = run_wide   # wide runs (see the module's docstring); None: none
        self._io = io
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self.max_padding_ratio = max_padding_ratio
        self._on_run = on_run   # each finished run's RunRecord (the model's statistics)
        # release(here=True) runs a batch on the caller's thread when it should take at most this long
        # (serve/engine/runkinds.py). Never with a state store write before the answers: a network
        # round trip must not block the event loop.
        self._quick = runkinds.QuickRuns(inline_run_us * 1000 if before_answer is None else 0)
        # finished runs' items and their outputs, before any caller sees them (the state
        # store's write-through: one call per run, or fewer: see _finish_runs)
        self._before_answer = before_answer
        self._queue: collections.deque[Work] = collections.deque()
        self._recent_rows: collections.deque[int] = collections.deque(maxlen=8)   # rows of the last runs
        self._cv = threading.Condition()
        self._closed = False
        self.instances = instances  # runs that may be in progress at once
        self._running = 0           # runs in progress (scheduler threads or inline callers)
        self._held = 0              # open together() blocks: the schedulers leave the queue alone
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
                         for i in range(instances)]
        self._done: queue.SimpleQueue = queue.SimpleQueue()   # finished runs, for the completion thread
        self._done_closed = False   # the completion thread was told to stop: finish on the run's thread
        self._completer = threading.Thread(target=self._complete_loop, name=f"batcher-{name}-done",
                                           daemon=True)
        self._completer.start()
        for thread in self._threads:
            thread.start()

    # ---- public -------------------------------------------------------------
    def submit(self, work: Work, inline: bool = False) -> Future:
        """Queue work; the Future resolves to its outputs. With `inline`, a caller that is
        going to wait anyway runs its work on its own thread when the model is idle (no
        queue, no run in progress) and recent runs held no more rows than this work: no
        hand-off to the scheduler thread at concurrency 1. Under load it queues, so the
        rows right behind it can share its run."""
        with self._cv:
            if self._closed:
                raise Unavailable(f"model '{self.name}' is shutting down")
            if len(self._queue) >= self.max_queue_size:
                raise Unavailable(f"model '{self.name}': queue full ({self.max_queue_size} requests waiting)")
            work.enqueued = time.monotonic()
            self._io.sign(work)
            run_here = (inline and not self._running and not self._queue
                        and max(self._recent_rows, default=1) <= work.rows)
            if run_here:
                self._running += 1
                self._recent_rows.append(work.rows)
            else:
                self._queue.append(work)
                if not self._held:      # a hold's release wakes the scheduler
                    self._cv.notify()
        if run_here:
            self._run_here([work])
        return work.future

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Work queued inside the block waits until its end, so it can share one run (the rows
        of a request that carries many sequences)."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    def lone(self) -> bool:
        """Work queued now would run alone: nothing queued or running, and the last runs held
        one row each (concurrency 1). Holding the queue for company would only delay it.
        Read without the lock: a hint."""
        return not self._queue and not self._running and max(self._recent_rows, default=1) <= 1

    def hold(self) -> None:
        """Keep the schedulers off the queue until the matching release() (together(), as two calls)."""
        with self._cv:
            self._held += 1

    def release(self, here: bool = False) -> None:
        """End a hold. With `here` (the event loop, when its Coalescer releases the hold), a next batch
        that recent runs say is quick (inline_run_us) runs on this thread instead of waking a scheduler."""
        with self._cv:
            self._held -= 1
            if self._held or not self._queue:
                return
            batch = self._quick_batch() if here else None
            if batch is None:
                self._cv.notify_all()
                return
        self._run_here(batch)

    def quick(self) -> bool:
        """The last run was quick enough to run on the event loop: worth holding a lone request until the
        loop releases it (Coalescer) to save the hand-offs. Read without the lock: a hint."""
        return self._quick.last_fits()

    def cancel(self, work: Work) -> bool:
        """Remove work that has not started; True when it was still queued."""
        with self._cv:
            try:
                self._queue.remove(work)
            except ValueError:
                return False
        work.future.set_exception(Cancelled("request cancelled by the client"))
        return True

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        until = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))
        with self._cv:           # after the runs the schedulers finished: their callers get answers
            self._done_closed = True
            self._done.put(None)
        self._completer.join(max(0.0, until - time.monotonic()))

    # ---- scheduling -----------------------------------------------------------
    def _compatible(self, group: _Group, w: Work) -> bool:
        if not self._io.mergeable or group.rows + w.rows > self.max_batch_size or w.key != group.key:
            return False
        if group.min_len == group.max_len == w.seq_len:
            return True  # equal shapes: always exact
        # Right-padding is exact only for causal outputs, without final state.
        if not self._io.pad or group.need_state or w.need_state:
            return False
        padded = (group.rows + w.rows) * max(group.max_len, w.seq_len)
        return padded <= self.max_padding_ratio * (group.real + w.rows * w.seq_len)

    def _quick_batch(self) -> list[Work] | None:
        """(Under the lock.) The next batch, counted as running, when it may run on the caller's thread:
        an estimate within the budget and a free instance. Else None, the queue unchanged."""
        if not self._quick.known() or self._running >= self.instances:
            return None
        head = self._queue[0]
        if not self._quick.fits(head.rows * max(head.seq_len, 1)):   # the head alone is too long
            return None
        group = self._take()
        if not self._quick.fits(group.rows * max(group.max_len, 1)):
            self._queue.extendleft(reversed(group.items))
            return None
        self._running += 1
        self._recent_rows.append(group.rows)
        return group.items

    def _run_here(self, batch: list[Work]) -> None:
        """Run a batch taken for this thread (already counted in _running) and answer its callers here."""
        try:
            self._execute(batch, finish_here=True)
        finally:
            with self._cv:
                self._running -= 1
                if self._queue:     # only queued work needs a scheduler woken
                    self._cv.notify()

    def _take(self) -> _Group:
        """Pop the head and every queued item that can share its run (FIFO order)."""
        first = self._queue.popleft()
        group = _Group(first)
        kept: collections.deque[Work] = collections.deque()
        while self._queue and group.rows < self.max_batch_size:
            w = self._queue.popleft()
            if self._compatible(group, w):
                group.add(w)
            else:
                kept.append(w)
        kept.extend(self._queue)
        self._queue = kept
        return group

    def _loop(self) -> None:
        while True:
            with self._cv:
                idle = not self._queue      # nothing queued up while this scheduler was busy
                while (not self._queue or self._running >= self.instances or self._held) and not self._closed:
                    self._cv.wait()
                if not self._queue and self._closed:
                    return
                self._running += 1
                batch = self._take().items
                # After an idle spell, wait for more rows, but only up to what recent runs show is
                # coming. Work that queued up during a run goes at once: waiting then only idles.
                target = min(self.max_batch_size, max(self._recent_rows, default=1))
                if idle and self.max_queue_delay > 0 and sum(w.rows for w in batch) < target:
                    until = time.monotonic() + self.max_queue_delay
                    while sum(w.rows for w in batch) < target and not self._closed:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        if not self._queue:
                            self._cv.wait(left)
                            continue
                        self._queue.extendleft(reversed(batch))
                        batch = self._take().items
                self._recent_rows.append(sum(w.rows for w in batch))
            try:
                self._execute(batch)
            finally:
                del batch   # its tensors must not wait here for the next run (idle memory)
                with self._cv:
                    self._running -= 1
                    if self._queue and self.instances > 1:   # another scheduler may take it
                        self._cv.notify()

    def _execute(self, batch: list[Work], finish_here: bool = False) -> None:
        """Run a batch. The scheduler hands the finishing (split, statistics, callers' futures)
        to the completion thread and goes straight on to the next run: waking callers first
        would have them contend for the GIL with the next batch's assembly, idling the model.
        An inline caller (finish_here) finishes its own run."""
        now = time.monotonic()
        live: list[Work] = []
        for w in batch:
            if w.future.done():
                continue
            if w.is_cancelled is not None and w.is_cancelled():
                w.future.set_exception(Cancelled("request cancelled by the client"))
            elif w.deadline is not None and now > w.deadline:
                w.future.set_exception(DeadlineExceeded(
                    f"deadline passed after {1e3 * (now - w.enqueued):.1f} ms in the queue, before it ran"))
            else:
                live.append(w)
        if not live:
            return
        queue_ns = [int((now - w.enqueued) * 1e9) for w in live]
        try:
            t0 = time.perf_counter_ns()
            feeds = self._io.assemble(live)
            t1 = time.perf_counter_ns()
            out = self._run_for(live)(feeds)
            times = (queue_ns, t1 - t0, time.perf_counter_ns() - t1)
            if self._quick.budget_ns:
                self._quick.learn(live, times[2])
        except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
            self._fail(live, e)
            return
        if not finish_here:
            with self._cv:   # close() may have stopped the completion thread (a run outlived it)
                # Nothing queued: no next run to start, so this thread answers its callers itself
                # (one thread hand-off fewer: what concurrency 1 waits for), unless answering
                # needs a state store round trip (before_answer), which work arriving meanwhile
                # should not wait for.
                finish_here = self._done_closed or (not self._queue and self._before_answer is None)
                if not finish_here:
                    self._done.put((live, out, times))
        if finish_here:
            self._finish(live, out, times)

    def _run_for(self, live: list[Work]) -> RunFn:
        """The run function of a batch: lone, wide or shared (serve/engine/runkinds.py)."""
        if self._run_lone is not None and runkinds.lone(self._io, live, bool(self._queue), self._running,
                                                        self._recent_rows):
            return self._run_lone
        if self._run_wide is not None and runkinds.wide(self._io, live):
            return self._run_wide
        return self._run

    def _complete_loop(self) -> None:
        while True:
            runs = [self._done.get()]
            while not self._done.empty():   # runs that finished meanwhile are answered together
                runs.append(self._done.get_nowait())
            stop = runs[-1] is None
            self._finish_runs([r for r in runs if r is not None])
            del runs   # the last runs' tensors must not wait here for the next run (idle memory)
            if stop:
                return

    def _finish(self, live: list[Work], out: dict[str, np.ndarray],
                times: tuple[list[int], int, int]) -> None:
        self._finish_runs([(live, out, times)])

    def _finish_runs(self, runs: list[tuple[list[Work], dict[str, np.ndarray], tuple[list[int], int, int]]]
                     ) -> None:
        """Split each run's outputs, record the run (before the callers see their results), call
        before_answer once for all of them (the state store's write: one round trip however many
        runs finished while the last one was written) and complete the callers. Never raises: a
        failure fails the callers concerned, so neither the completion thread nor an inline
        caller is taken down by one batch. times: (each item's queue ns, assembling ns, onnxruntime ns)."""
        items: list[Work] = []
        results: list[dict[str, np.ndarray]] = []
        for live, out, times in runs:
            try:
                t0 = time.perf_counter_ns()
                split = [r if w.finish is None else w.finish(r) for w, r in zip(live, self._io.split(live, out))]
            except BaseException as e:  # noqa: BLE001 - handed to this run's callers
                self._fail(live, e)
                continue
            if self._on_run is not None:
                queue_ns, input_ns, compute_ns = times
                try:
                    self._on_run(RunRecord(sum(w.rows for w in live), queue_ns, input_ns, compute_ns,
                                           time.perf_counter_ns() - t0))
                except Exception:  # statistics must never break serving
                    log.exception("on_run hook failed")
            items += live
            results += split
        try:
            if self._before_answer is not None and any(w.tag is not None for w in items):
                self._before_answer(items, results)
            for w, r in zip(items, results):
                if not w.future.done():
                    w.future.set_result(r)   # Future runs its callbacks here, catching their errors
        except BaseException as e:  # noqa: BLE001 - handed to every caller not yet answered
            self._fail(items, e)

    def _fail(self, live: list[Work], e: BaseException) -> None:
        log.exception("model %s: batch of %d failed", self.name, len(live), exc_info=e)
        for w in live:
            if not w.future.done():
                w.future.set_exception(e)
