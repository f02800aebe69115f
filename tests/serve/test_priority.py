"""--handler-sched-batch / --handler-nice: gRPC handler threads run SCHED_BATCH and nicer;
the threads that run onnxruntime (the batchers) keep the process's scheduling, also for a
model loaded over gRPC from a handler thread. Checked from /proc on a real server in this
process (Linux)."""
from __future__ import annotations

import os
import sys
import threading

import pytest
import tritonclient.grpc as tc

from rnnserve.serve.client import RnnClient
from rnnserve.serve.frontend.priority import lower_this_thread
from tests.fixtures import serving

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling")


def _nice(tid: int):
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except ProcessLookupError:   # the thread has ended since it was listed
        return None


def _policy(tid: int):
    try:
        return os.sched_getscheduler(tid)
    except ProcessLookupError:
        return None


def _batcher_tids(server, model: str) -> list:
    engine = server.dataplane.engine(model)
    return [t.native_id for t in engine.batcher._threads]


def _process_tids() -> list:
    return [int(t) for t in os.listdir("/proc/self/task")]


def test_handler_threads_nicer_than_the_onnxruntime_threads(hello_repo):
    base = _nice(threading.get_native_id())
    before = set(_process_tids())
    with serving(hello_repo, handler_sched_batch=True, handler_nice=7,
                 model_control_mode="explicit") as (server, address):
        with RnnClient(address) as client:
            assert client.predict("emb-lstm", "hello")["decoded"] == "ohlol"
            new = [t for t in _process_tids() if t not in before]
            handlers = [t for t in new if _nice(t) == base + 7]
            assert handlers, "no thread of the server runs at the handler niceness"
            assert all(_policy(t) in (os.SCHED_BATCH, None) for t in handlers)
            for tid in _batcher_tids(server, "emb-lstm"):
                assert _nice(tid) == base and _policy(tid) == os.SCHED_OTHER
            # A model (re)loaded over gRPC: its onnxruntime threads are started by the data
            # plane's admin thread, not by the (nicer) handler thread that took the call.
            tc.InferenceServerClient(address).load_model("emb-lstm")
            for tid in _batcher_tids(server, "emb-lstm"):
                assert _nice(tid) == base and _policy(tid) == os.SCHED_OTHER
            assert client.predict("emb-lstm", "hello")["decoded"] == "ohlol"


def test_default_is_sched_batch_without_nice(hello_repo):
    base = _nice(threading.get_native_id())
    before = set(_process_tids())
    with serving(hello_repo) as (server, address):
        with RnnClient(address) as client:
            client.predict("emb-gru", "hello")
            new = [t for t in _process_tids() if t not in before]
            assert new and all(_nice(t) in (base, None) for t in new)
            assert any(_policy(t) == os.SCHED_BATCH for t in new)
            for tid in _batcher_tids(server, "emb-gru"):
                assert _policy(tid) == os.SCHED_OTHER


def test_both_off_leaves_every_thread_alone(hello_repo):
    base = _nice(threading.get_native_id())
    before = set(_process_tids())
    with serving(hello_repo, handler_sched_batch=False, handler_nice=0) as (_, address):
        with RnnClient(address) as client:
            client.predict("emb-gru", "hello")
            new = [t for t in _process_tids() if t not in before]
            assert new and all(_nice(t) in (base, None) and _policy(t) in (os.SCHED_OTHER, None) for t in new)


def test_lower_this_thread_only_touches_the_calling_thread():
    base = _nice(threading.get_native_id())
    seen = {}

    def worker():
        seen["applied"] = lower_this_thread(False, 3)
        seen["tid"] = threading.get_native_id()
        seen["nice"] = _nice(seen["tid"])

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["applied"] and seen["nice"] == base + 3
    assert _nice(threading.get_native_id()) == base and not lower_this_thread(False, 0)
