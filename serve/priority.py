"""CPU scheduling priority of the request-handling threads (Linux).

Under load, every queued request waits for the onnxruntime run in progress on the
batcher's thread. When a gRPC handler thread wakes up (a new request, an answer
to send) it preempts that run on a small machine, and the run everyone waits for
takes longer. With `--handler-nice N` (N > 0) each handler thread moves itself to
SCHED_BATCH (no wake-up preemption) and lowers its priority by N. Threads inherit
this from the thread that starts them, so onnxruntime's threads are never started
from a handler thread (serve/dataplane.py runs model loads on its own admin
thread). Lowering one's own priority needs no privilege; where the system refuses
anyway, the threads keep their priority and this is logged once.
"""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_warned = threading.Event()


def lower_this_thread(nice: int) -> bool:
    """Make the calling thread SCHED_BATCH and `nice` steps nicer; True when applied."""
    if nice <= 0:
        return False
    try:
        tid = threading.get_native_id()
        if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))   # 0 = this thread
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        return True
    except (OSError, AttributeError) as exc:
        if not _warned.is_set():
            _warned.set()
            log.info("handler threads keep their CPU priority (--handler-nice %d): %s", nice, exc)
        return False


def handler_initializer(nice: int):
    """A ThreadPoolExecutor initializer for the gRPC handler threads, or None when off."""
    if nice <= 0:
        return None
    return lambda: lower_this_thread(nice)
