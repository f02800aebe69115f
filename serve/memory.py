"""Give memory back to the operating system after large requests.

glibc keeps freed heap memory for reuse, and onnxruntime's CPU arena keeps the buffers of
its largest run, so after one large request (tens of MB of tensors and protobuf buffers)
an idle server would stay at its peak. Two measures: blocks of MMAP_THRESHOLD_BYTES and
more always get their own mapping, returned the moment they are freed (glibc would
otherwise raise that threshold after the first large free and serve the next large blocks
from the heap); and a Trimmer thread watches the process's resident size: while it is
TRIM_STEP_BYTES or more above the idle floor it has the models' arenas hand back their
free memory (its `release` hook: Repository.release_memory), runs the garbage collector
and calls malloc_trim(0), which returns the free pages, at most every MAX_BACKOFF_S while
trimming frees nothing (the memory is in use, or the request is still running); after
GIVE_UP_S of that it takes the size as the new floor. Nothing here touches requests;
where malloc_trim does not exist (not glibc) the Trimmer does nothing. bench/memory.py
measures the effect.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_STEP_BYTES = 16 * 2**20
MMAP_THRESHOLD_BYTES = 2**20
M_MMAP_THRESHOLD = -3   # mallopt's parameter number (malloc.h)
CHECK_S = 0.5
MAX_BACKOFF_S = 2.0
GIVE_UP_S = 30.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc_function(name: str, argtypes: list):
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def map_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (process-wide); False where there is no mallopt."""
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold))


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class Trimmer:
    """A daemon thread: the arenas' release and malloc_trim(0) whenever the resident size grew by
    TRIM_STEP_BYTES."""

    def __init__(self, release: Callable[[], None] | None = None, step: int = TRIM_STEP_BYTES,
                 interval: float = CHECK_S):
        """release: called before each trim, to free what malloc cannot see as free (the arenas)."""
        map_large_blocks()
        self._release = release
        self._trim = _libc_function("malloc_trim", [ctypes.c_size_t])
        self._step, self._interval = step, interval
        self._stop = threading.Event()
        self._thread = None
        if self._trim is not None and resident_bytes():
            self._thread = threading.Thread(target=self._loop, name="rnnserve-trim", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        floor, wait, next_at, useless_since = resident_bytes(), self._interval, 0.0, None
        while not self._stop.wait(self._interval):
            now = resident_bytes()
            if now < floor + self._step:
                floor, wait, useless_since = min(floor, now), self._interval, None
                continue
            t = time.monotonic()
            if t < next_at:
                continue
            if self._release is not None:
                try:
                    self._release()
                except Exception:  # noqa: BLE001 - housekeeping must never take the thread down
                    log.exception("releasing the models' memory failed")
            # Then the garbage: a refused request's tensors stay in a reference cycle (its
            # exception's traceback and frames) that an idle server, allocating nothing, never collects.
            gc.collect()
            self._trim(0)
            after = resident_bytes()
            log.debug("malloc_trim: resident %d -> %d MiB", now >> 20, after >> 20)
            if now - after >= self._step:   # it helped: look again soon
                wait, useless_since = self._interval, None
            else:
                wait = min(wait * 2, MAX_BACKOFF_S)
                useless_since = useless_since or t
                if t - useless_since >= GIVE_UP_S:   # in use, not free: the new normal
                    floor, useless_since = after, None
            next_at = t + wait

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
