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


class ChunkedRun:
    """One request run as a chain of time chunks; `future` completes with its outputs."""

    def __init__(self, submit: Callable[[Work], object], io: ModelIO, inputs: dict[str, np.ndarray],
                 states: States, need_state: bool, keep: Collection[str] | None, chunk: int,
                 deadline: float | None = None, is_cancelled: Callable[[], bool] | None = None):
        self.future: Future = Future()
        self._submit, self._io, self._inputs = submit, io, inputs
        self._need_state, self._chunk = need_state, chunk
        self._deadline, self._is_cancelled = deadline, is_cancelled
        self._keep = [t for t in io.outputs if keep is None or t.name in keep]
        self._steps = io.time_len(inputs) or 0
        self._out: dict[str, np.ndarray] = {}
        self._start = 0
        self._lock = threading.Lock()
        self._current: Work | None = None
        self._stopped = False
        self._states = states

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

    def _queue(self, states: States) -> None:
        stop = min(self._start + self._chunk, self._steps)
        work = Work(self._io.time_slice(self._inputs, self._start, stop), states,
                    need_state=self._need_state or stop < self._steps,
                    deadline=self._deadline, is_cancelled=self._is_cancelled)
        with self._lock:
            self._current = work
        self._submit(work)
        work.future.add_done_callback(self._chunk_done)

    def _chunk_done(self, done) -> None:
        """On the Batcher's completion thread: keep this chunk's outputs, queue the next chunk."""
        try:
            out = done.result()
            stop = min(self._start + self._chunk, self._steps)
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
            states = tuple(out[s.output] for s in self._io.states)
            if stop >= self._steps:
                if self._need_state:
                    self._out.update(zip(self._io.state_outputs, states))
                out, self._out = self._out, {}
                self._release()
                self.future.set_result(out)
                return
            with self._lock:
                stopped = self._stopped
            if stopped:
                raise Cancelled("the request was cancelled by the client")
            self._start = stop
            self._queue(states)
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
