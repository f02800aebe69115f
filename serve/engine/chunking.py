"""Long runs of stateful models in time chunks, so one run's working memory stays bounded.

onnxruntime keeps every intermediate tensor of a run until the run ends: for a recurrent
model the embeddings, each layer's output at every step, the gates and the logits. A
request for the final state alone over rows x steps tokens would need many times its own
size. So a request whose run is estimated (`steps_per_chunk`) above the budget
(--max-run-bytes) runs as a chain of chunks along the time axis instead, each starting
from the final states of the one before. That is exact: it is what a sequence does with
the same steps, and the export's parity gate checks that chunked runs equal the whole run
for every stateful model (ModelIO.chunkable says which models qualify).

Each chunk is one Work for the model's Batcher, queued when the previous chunk finished:
the Batcher stays the only scheduler, equal chunks of concurrent long requests share
runs, and other requests run between the chunks of a long one. Of the outputs with a time
axis only those the caller reads are kept, written into one array each as the chunks
finish; the state outputs are the last chunk's. Short requests are never split, so they
batch as before.

Sequence steps (serve/engine/sequences.py: a single step or a many-sequence unit) are
chained the same way: only the last chunk carries the step, and its result in the Batcher
is already the whole step's outputs, so the write-through sees the whole step once (its
final state and, for a step with an id, its whole answer), while the earlier chunks write
nothing and move no step counter. A chain that is cancelled or expires between chunks
fails, and the step is not applied.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future

import numpy as np

from rnnserve.serve.engine.modelio import ModelIO, Work
from rnnserve.serve.errors import Cancelled

MIN_CHUNK_STEPS = 16   # shorter chunks would cost more in per-run overhead than they save
# The graph's own intermediates per row and step, as a multiple of the state's size per row:
# each layer's output and gates (3-4 per hidden unit for GRU/LSTM) and their copies between
# layouts. Calibrated with bench/memory.py (the README's Memory section).
STATE_FACTOR = 8

States = tuple[np.ndarray, ...]


def step_bytes(io: ModelIO, inputs: dict[str, np.ndarray], rows: int, steps: int) -> int:
    """Estimated bytes one run holds per row and time step: the inputs and outputs along time,
    and the graph's intermediates (STATE_FACTOR x the state per row)."""
    per_step = sum(inputs[t.name].nbytes for t in io.inputs if t.time_axis is not None) // max(rows * steps, 1)
    for t in io.outputs:
        per_step += (io.output_bytes(t.name, 1, 1) or (0, 0))[0]
    for name in io.state_outputs:
        per_step += STATE_FACTOR * (io.output_bytes(name, 1, 1) or (0, 0))[0]
    return max(per_step, 1)


def steps_per_chunk(io: ModelIO, inputs: dict[str, np.ndarray], budget: int) -> int | None:
    """The chunk length for a run over `inputs`, or None when it runs whole (a model that is
    not chunkable, budget 0, or a run within the budget)."""
    if not budget or not io.chunkable:
        return None
    steps = io.time_len(inputs)
    if steps is None or steps <= MIN_CHUNK_STEPS:
        return None
    rows = io.rows(inputs)
    per_step = step_bytes(io, inputs, rows, steps)
    if rows * steps * per_step <= budget:
        return None
    longest = max(MIN_CHUNK_STEPS, budget // (rows * per_step))
    if longest >= steps:
        return None
    chunks = math.ceil(steps / longest)
    return math.ceil(steps / chunks)   # even chunks: equal shapes can share a run


def chunked(submit: Callable[[Work], object], io: ModelIO, work: Work, budget: int,
            keep: Collection[str] | None = None) -> ChunkedRun | None:
    """`work` as a chain of time chunks through `submit` (the Batcher's) when its run is estimated
    above `budget` (not queued yet: start() it), else None (it runs whole)."""
    chunk = steps_per_chunk(io, work.inputs, budget)
    return None if chunk is None else ChunkedRun(submit, io, work, keep, chunk)


class ChunkedRun:
    """One Work run as a chain of time chunks; its future completes with the whole run's outputs.

    Each chunk's result is made in the Batcher (Work.finish): a chunk's kept outputs are written
    into the chain's arrays there, and the last chunk's result is the whole run's outputs. The
    last chunk carries the work's tag, so the Batcher's before_answer (a sequence step's
    write-through) sees the whole step, once; the earlier chunks carry none."""

    def __init__(self, submit: Callable[[Work], object], io: ModelIO, work: Work,
                 keep: Collection[str] | None, chunk: int):
        self.future: Future = work.future
        self._submit, self._io, self._inputs = submit, io, work.inputs
        self._need_state, self._chunk, self._tag = work.need_state, chunk, work.tag
        self._deadline, self._is_cancelled = work.deadline, work.is_cancelled
        self._keep = [t for t in io.outputs if keep is None or t.name in keep]
        self._steps = io.time_len(work.inputs) or 0
        self._out: dict[str, np.ndarray] = {}
        self._start = 0
        self._lock = threading.Lock()
        self._current: Work | None = None
        self._stopped = False
        self._states: States = work.states

    def start(self) -> Future:
        """Queue the first chunk (raises what the Batcher's submit raises: a full queue)."""
        self._queue(self._states)
        self._states = ()
        return self.future

    @property
    def chunks(self) -> int:
        return math.ceil(self._steps / self._chunk)

    def cancel(self, cancel_work: Callable[[Work], bool]) -> bool:
        """Stop the chain; True when its current chunk was still queued (taken out of the queue)."""
        with self._lock:
            self._stopped = True
            current = self._current
        return current is not None and cancel_work(current)

    def _stop(self) -> int:
        return min(self._start + self._chunk, self._steps)

    def _queue(self, states: States) -> None:
        last = self._stop() >= self._steps
        work = Work(self._io.time_slice(self._inputs, self._start, self._stop()), states,
                    need_state=self._need_state or not last, deadline=self._deadline,
                    is_cancelled=self._is_cancelled, tag=self._tag if last else None, finish=self._take)
        with self._lock:
            self._current = work
        self._submit(work)
        work.future.add_done_callback(self._chunk_done)

    def _take(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """(Work.finish, in the Batcher) Keep this chunk's outputs along time: -> the final states
        to go on from, or after the last chunk the whole run's outputs."""
        stop = self._stop()
        for t in self._keep:
            part, axis = out[t.name], t.time_axis
            assert axis is not None     # chunkable models' outputs all have a time axis
            if t.name not in self._out:
                shape = list(part.shape)
                shape[axis] = self._steps
                self._out[t.name] = np.empty(shape, part.dtype)
            index = [slice(None)] * part.ndim
            index[axis] = slice(self._start, stop)
            self._out[t.name][tuple(index)] = part
        if stop < self._steps:
            return {name: out[name] for name in self._io.state_outputs}
        whole, self._out = self._out, {}
        if self._need_state:
            whole.update((name, out[name]) for name in self._io.state_outputs)
        return whole

    def _chunk_done(self, done) -> None:
        """On the Batcher's completion thread: complete the chain, or queue the next chunk."""
        try:
            out = done.result()
            if self._stop() >= self._steps:
                self._release()
                self.future.set_result(out)
                return
            with self._lock:
                stopped = self._stopped
            if stopped:
                raise Cancelled("the request was cancelled by the client")
            self._start = self._stop()
            self._queue(tuple(out[name] for name in self._io.state_outputs))
        except BaseException as e:  # noqa: BLE001 - the caller waits on the chain's future
            self._release()
            if not self.future.done():
                self.future.set_exception(e)

    def _release(self) -> None:
        """Drop the request's tensors now: the chain, its Work and their futures' callbacks form
        a reference cycle that only the garbage collector would otherwise free."""
        with self._lock:
            self._current = None
        self._inputs, self._out = {}, {}
