"""Per-model-version statistics: the one place runs and requests are counted.

Two records, each produced once and fed to ModelStatistics and (with --metrics-port)
the Prometheus metrics together, so the two sources cannot disagree:

- RunRecord: one per onnxruntime run of a batch, made by the model's Batcher when the
  run finishes (before its callers see their results). It counts, Triton's way,
  execution_count (runs) and inference_count (rows served: every row of every work
  item, so inference_count >= execution_count), batch_stats by real batch size, and
  per work item queue, compute_input (assembling the batch's feeds), compute_infer
  (onnxruntime) and compute_output (splitting the outputs), each item charged its
  whole run's times. The four item counts are therefore always equal (perf_analyzer
  refuses statistics where they differ). A work item is a tensor request, a text
  request, a text-stream chunk, one generate step or one time chunk of a long request
  (serve/engine/chunking.py). Warm-up runs are not counted.
- RequestRecord: one per answered inference request, made by the front end's request
  observation (serve/frontend/observe.py) with the status code the client got. It
  counts success / fail (with their durations) for the version the request went to,
  and rnnserve_requests_total / rnnserve_request_duration_seconds.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

from rnnserve.serve.wire.types import DurationStat, ModelStats


class RunRecord(NamedTuple):
    """One onnxruntime run of a batch of work items."""
    rows: int                      # rows run: the sum of the items' rows
    queue_ns: Sequence[int]        # each item's wait in the queue
    input_ns: int                  # assembling the feeds
    compute_ns: int                # the onnxruntime run
    output_ns: int                 # splitting the outputs back to the items


class RequestRecord(NamedTuple):
    """One answered inference request. `code` is the gRPC status name the client got (OK, ...);
    `model` / `version` are what the request named (version "" = the newest READY one)."""
    method: str
    model: str
    version: str
    code: str
    seconds: float


def _add(stat: DurationStat, ns: int, count: int = 1) -> None:
    stat.count += count
    stat.ns += int(ns)


class ModelCounters:
    """The counters of one model version (thread-safe). `metrics` is the version's bound
    Prometheus series (serve/metrics.py ModelMetrics) or None."""

    def __init__(self, name: str, version: str, metrics=None):
        self._lock = threading.Lock()
        self._stats = ModelStats(name=name, version=version)
        self._metrics = metrics

    def record_run(self, run: RunRecord) -> None:
        items = len(run.queue_ns)
        with self._lock:
            s = self._stats
            s.inference_count += run.rows
            s.execution_count += 1
            _add(s.batch_stats.setdefault(run.rows, DurationStat()), run.compute_ns)
            _add(s.queue, sum(run.queue_ns), items)
            _add(s.compute_input, run.input_ns * items, items)
            _add(s.compute_infer, run.compute_ns * items, items)
            _add(s.compute_output, run.output_ns * items, items)
            s.last_inference_ms = int(time.time() * 1000)
        if self._metrics is not None:
            self._metrics.record_run(run)

    def record_request(self, ok: bool, ns: int) -> None:
        """One request's outcome in ModelStatistics. DataPlane.record_request calls it together
        with the Prometheus request series (labelled by method and code, which it resolves)."""
        with self._lock:
            _add(self._stats.success if ok else self._stats.fail, ns)

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
