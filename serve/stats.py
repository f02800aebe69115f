"""Per-model-version statistics (thread-safe counters behind ModelStatistics).

One StatsRecorder lives on each ModelInstance:
- ModelInstance.run records every onnxruntime run: execution_count, and batch_stats
  (real batch size -> runs, compute ns);
- the model's Batcher records, per batch, every work item it ran (record_batch):
  queue time, and compute_infer as Triton counts it (each item is charged its whole
  batch's compute time). compute_input/compute_output are counted per item there
  too, so queue, compute_input, compute_infer and compute_output always have the
  same count (perf_analyzer refuses statistics where they differ). An item is a
  tensor request, a text request, a text-stream chunk or one generate step;
- the data plane records each request's outcome: inference_count (rows),
  success/fail, and the nanoseconds of compute_input (validation, queueing) and
  compute_output (building the response).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from rnnserve.serve.errors import ServeError
from rnnserve.serve.wire.types import DurationStat, ModelStats


def _add(stat: DurationStat, ns: int, count: int = 1) -> None:
    stat.count += count
    stat.ns += int(ns)


class StatsRecorder:
    def __init__(self, name: str, version: str):
        self._lock = threading.Lock()
        self._name = name
        self._version = version
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._stats = ModelStats(name=self._name, version=self._version)

    def record_execution(self, batch_size: int, infer_ns: int) -> None:
        """One onnxruntime run over `batch_size` rows."""
        with self._lock:
            s = self._stats
            s.execution_count += 1
            _add(s.batch_stats.setdefault(batch_size, DurationStat()), infer_ns)

    def record_batch(self, queue_ns: Sequence[int], infer_ns: int) -> None:
        """One batch of work items (the Batcher's on_batch hook): each item's queue time, and
        the batch's compute time charged to every item."""
        items = len(queue_ns)
        with self._lock:
            s = self._stats
            _add(s.queue, sum(queue_ns), items)
            _add(s.compute_infer, infer_ns * items, items)
            s.compute_input.count += items
            s.compute_output.count += items

    def record_request(self, ok: bool, total_ns: int, rows: int = 1, input_ns: int = 0,
                       output_ns: int = 0) -> None:
        """One request's outcome (rows = batch rows it carried)."""
        with self._lock:
            s = self._stats
            if ok:
                s.inference_count += rows
                _add(s.success, total_ns)
                _add(s.compute_input, input_ns, 0)     # counted per item in record_batch
                _add(s.compute_output, output_ns, 0)
                s.last_inference_ms = int(time.time() * 1000)
            else:
                _add(s.fail, total_ns)

    def snapshot(self) -> ModelStats:
        with self._lock:
            s = self._stats
            return replace(
                s,
                success=replace(s.success), fail=replace(s.fail), queue=replace(s.queue),
                compute_input=replace(s.compute_input), compute_infer=replace(s.compute_infer),
                compute_output=replace(s.compute_output),
                batch_stats={k: replace(v) for k, v in sorted(s.batch_stats.items())},
            )


class RequestTimer:
    """Context manager recording one request's outcome in a StatsRecorder.

    A serve.errors.* exception counts as a failure; success counts only when
    `count` (a generate call records once, at its end); other exceptions are
    internal errors and are left to the log.
    """

    def __init__(self, stats: StatsRecorder, count: bool = True):
        self.stats, self.count = stats, count

    def __enter__(self) -> RequestTimer:
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        failed = exc_type is not None and issubclass(exc_type, ServeError)
        if failed or (self.count and exc_type is None):
            self.stats.record_request(not failed, time.perf_counter_ns() - self.t0)
        return False
