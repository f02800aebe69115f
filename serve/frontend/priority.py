"""CPU scheduling of the request-handling threads (Linux).

Under load, queued work waits for the onnxruntime run in progress on the batcher's
thread, and every front-end thread that wakes up (a new request, an answer to send)
may preempt that run on a small machine. The front end's threads are the gRPC event
loop's thread and the pool for calls that wait in the data plane (serve/frontend/
server.py); each applies two settings to itself when it starts:
- `--handler-sched-batch` (default on): SCHED_BATCH, i.e. no wake-up preemption;
  the threads keep their normal share of the CPU. Measured on 2 cores: about +6%
  streamed steps/s, stateless throughput unchanged.
- `--handler-nice N` (default 0): also N steps nicer. On 2 cores, N = 10 moved stateless
  throughput at concurrency 8 (seq 64, long runs) by 0 to +8% in A/B runs, but cost
  10-15% of streamed steps/s, where the front end itself is the bottleneck; so it is opt-in.
Threads inherit both from the thread that starts them, so onnxruntime's threads are
never started from a handler thread (serve/dataplane/plane.py runs model loads on its own
admin thread). Neither needs privilege; where the system refuses anyway, the threads
keep their scheduling and this is logged once.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_warned = threading.Event()


def lower_this_thread(sched_batch: bool, nice: int) -> bool:
    """Make the calling thread SCHED_BATCH (if asked) and `nice` steps nicer; True when applied."""
    if not sched_batch and nice <= 0:
        return False
    try:
        if sched_batch:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))   # 0 = this thread
        if nice > 0:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        return True
    except (OSError, AttributeError) as exc:
        if not _warned.is_set():
            _warned.set()
            log.info("handler threads keep their CPU scheduling (sched_batch=%s, nice %d): %s",
                     sched_batch, nice, exc)
        return False


def handler_initializer(sched_batch: bool, nice: int) -> Callable[[], bool] | None:
    """A ThreadPoolExecutor initializer for the gRPC handler threads, or None when both are off."""
    if not sched_batch and nice <= 0:
        return None
    return lambda: lower_this_thread(sched_batch, nice)
