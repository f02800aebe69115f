"""Dynamic batching and server-side sequences over real exported models and
real onnxruntime sessions (no gRPC here; tests/test_sequences_grpc.py goes
over the wire)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.metadata import parse_metadata
from export.onnx_export import export_checkpoint
from serve.batching import Batcher, ModelIO, Work
from serve.errors import Cancelled, DeadlineExceeded, InvalidArgument, Unavailable
from serve.sequences import SequenceManager
from train.checkpoint import save_checkpoint
from train.model import CharRNN, ModelConfig

VOCAB = [chr(ord("a") + i) for i in range(12)]
ARCHS = {
    "rnncell": ModelConfig(arch="rnncell", vocab_size=12, encoding="onehot", hidden_size=12, head=False),
    "rnn": ModelConfig(arch="rnn", vocab_size=12, encoding="onehot", hidden_size=16, num_layers=2),
    "lstm": ModelConfig(arch="lstm", vocab_size=12, emb_size=8, hidden_size=16, num_layers=2),
    "gru": ModelConfig(arch="gru", vocab_size=12, emb_size=8, hidden_size=16, num_layers=3),
    "bilstm": ModelConfig(arch="lstm", vocab_size=12, emb_size=8, hidden_size=16, num_layers=2,
                          bidirectional=True),
}
UNIDIRECTIONAL = ["rnncell", "rnn", "lstm", "gru"]


class Model:
    """A real exported model: its session, I/O names and a plain run()."""

    def __init__(self, path: str):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.meta = parse_metadata(self.sess.get_modelmeta().custom_metadata_map)
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.io = ModelIO(tuple(self.meta.state_inputs), tuple(self.meta.state_outputs), self.meta.streamable)
        self.runs = 0

    def run(self, feeds):
        self.runs += 1
        return dict(zip(self.outputs, self.sess.run(None, feeds)))

    def zero(self, batch):
        shape = self.meta.state_shape(batch)
        return tuple(np.zeros(shape, np.float32) for _ in self.io.state_inputs)

    def rand_state(self, rng, batch):
        shape = self.meta.state_shape(batch)
        return tuple(rng.standard_normal(shape).astype(np.float32) for _ in self.io.state_inputs)

    def alone(self, tokens, states):
        return self.run({"tokens": tokens, **dict(zip(self.io.state_inputs, states))})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    out = {}
    for i, (name, cfg) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        ckpt = root / name / "checkpoint.pt"
        save_checkpoint(str(ckpt), CharRNN(cfg), VOCAB, {"task": "charlm", "seq_len": 16}, {})
        res = export_checkpoint(str(ckpt), str(root / name))
        out[name] = Model(res.onnx_path)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_equals_alone(models, arch):
    """Concurrent requests of mixed lengths and states, merged by the batcher,
    give each request exactly what it gets when run alone."""
    m = models[arch]
    rng = np.random.default_rng(1)
    b = Batcher(arch, m.run, m.io, max_batch_size=16, max_queue_delay_us=2000)
    try:
        works = []
        for i in range(40):
            rows, T = int(rng.integers(1, 4)), int(rng.integers(1, 30))
            works.append(Work(rng.integers(0, 12, (rows, T)).astype(np.int64),
                              m.rand_state(rng, rows), need_state=bool(i % 3 == 0)))
        for w in works:
            b.submit(w)
        for w in works:
            got = w.future.result(timeout=30)
            ref = m.alone(w.tokens, w.states)
            assert got["logits"].shape == ref["logits"].shape
            np.testing.assert_allclose(got["logits"], ref["logits"], rtol=0, atol=1e-6)
            if w.need_state:
                for name in m.io.state_outputs:
                    np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-6)
        # The work really was merged: fewer runs than requests.
        assert b.stats.execution_count < len(works)
        assert b.stats.inference_count == sum(w.rows for w in works)
    finally:
        b.close()


@pytest.mark.parametrize("arch", UNIDIRECTIONAL)
def test_sequence_chunks_equal_whole(models, arch):
    """Streaming a sequence in chunks of any size through server-side state
    gives the logits of sending it whole (within 1e-5)."""
    m = models[arch]
    rng = np.random.default_rng(2)
    b = Batcher(arch, m.run, m.io, max_batch_size=8)
    sm = SequenceManager(arch, b, m.io, m.zero, max_sequences=16)
    try:
        tokens = rng.integers(0, 12, (1, 100)).astype(np.int64)
        whole = m.alone(tokens, m.zero(1))
        for chunk in (1, 3, 17, 100):
            futs, pos = [], 0
            while pos < tokens.shape[1]:
                piece = tokens[:, pos:pos + chunk]
                futs.append(sm.submit(("s", chunk), piece, start=pos == 0,
                                      end=pos + chunk >= tokens.shape[1]))
                pos += chunk
            got = np.concatenate([f.result(timeout=30)["logits"] for f in futs], axis=1)
            np.testing.assert_allclose(got, whole["logits"], rtol=0, atol=1e-5)
        assert sm.live() == 0  # every END freed its state
    finally:
        sm.close()
        b.close()


def test_many_sequences_interleaved_batch_together(models):
    m = models["lstm"]
    b = Batcher("lstm", m.run, m.io, max_batch_size=32)
    sm = SequenceManager("lstm", b, m.io, m.zero)
    rng = np.random.default_rng(3)
    seqs = {i: rng.integers(0, 12, (1, 40)).astype(np.int64) for i in range(16)}
    results = {}

    def stream(i):
        futs = [sm.submit(i, seqs[i][:, t:t + 1], start=t == 0, end=t == 39) for t in range(40)]
        results[i] = np.concatenate([f.result(timeout=60)["logits"] for f in futs], axis=1)

    try:
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(stream, seqs))
        for i, toks in seqs.items():
            np.testing.assert_allclose(results[i], m.alone(toks, m.zero(1))["logits"], rtol=0, atol=1e-5)
        # Steps of different sequences shared runs.
        assert b.stats.execution_count < 16 * 40
        assert max(b.stats.batch_sizes) > 1
    finally:
        sm.close()
        b.close()


def test_sequence_start_with_client_state_and_rules(models):
    m = models["gru"]
    rng = np.random.default_rng(4)
    b = Batcher("gru", m.run, m.io)
    sm = SequenceManager("gru", b, m.io, m.zero, max_sequences=2, idle_timeout_s=0.2)
    try:
        toks = rng.integers(0, 12, (1, 9)).astype(np.int64)
        h0 = m.rand_state(rng, 1)
        first = sm.submit("x", toks[:, :4], start=True, end=False, client_states=h0).result(timeout=30)
        second = sm.submit("x", toks[:, 4:], start=False, end=False).result(timeout=30)
        ref = m.alone(toks, h0)
        np.testing.assert_allclose(np.concatenate([first["logits"], second["logits"]], 1),
                                   ref["logits"], atol=1e-5, rtol=0)
        # Unknown sequence without START.
        with pytest.raises(InvalidArgument, match="START is required"):
            sm.submit("nope", toks, start=False, end=False)
        # State inputs only with START.
        with pytest.raises(InvalidArgument, match="only be sent with sequence_start"):
            sm.submit("x", toks, start=False, end=False, client_states=h0)
        # Capacity: "x" is live, "y" fills it, "z" is refused without evicting anything.
        sm.submit("y", toks, start=True, end=False).result(timeout=30)
        with pytest.raises(Unavailable, match="too many live sequences"):
            sm.submit("z", toks, start=True, end=False)
        assert sm.live() == 2
        # Idle sequences are freed after the timeout.
        deadline = time.monotonic() + 10
        while sm.live() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sm.live() == 0 and sm.freed_idle == 2
    finally:
        sm.close()
        b.close()


def test_bidirectional_refuses_sequences(models):
    m = models["bilstm"]
    b = Batcher("bilstm", m.run, m.io)
    sm = SequenceManager("bilstm", b, m.io, m.zero)
    try:
        with pytest.raises(InvalidArgument, match="bidirectional"):
            sm.submit(1, np.zeros((1, 3), np.int64), start=True, end=False)
    finally:
        sm.close()
        b.close()


class GatedRun:
    """The real session run, held at a gate so the queue can be observed."""

    def __init__(self, model: Model):
        self.model, self.gate, self.entered = model, threading.Event(), threading.Event()

    def __call__(self, feeds):
        self.entered.set()
        self.gate.wait(30)
        return self.model.run(feeds)


def test_backpressure_deadline_and_cancel(models):
    m = models["lstm"]
    run = GatedRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=1, max_queue_size=3)
    try:
        toks = np.ones((1, 5), np.int64)
        busy = b.submit(Work(toks, m.zero(1)))
        assert run.entered.wait(10)              # the scheduler is inside a run
        late = Work(toks, m.zero(1), deadline=time.monotonic() + 0.01)
        cancelled = Work(toks, m.zero(1))
        ok = Work(toks, m.zero(1))
        for w in (late, cancelled, ok):
            b.submit(w)
        with pytest.raises(Unavailable, match="queue full"):
            b.submit(Work(toks, m.zero(1)))
        assert b.cancel(cancelled) and b.queue_depth() == 2
        with pytest.raises(Cancelled):
            cancelled.future.result(timeout=1)
        time.sleep(0.05)                         # let the deadline pass while queued
        run.gate.set()
        busy.result(timeout=30)
        with pytest.raises(DeadlineExceeded):
            late.future.result(timeout=30)
        np.testing.assert_array_equal(ok.future.result(timeout=30)["logits"],
                                      m.alone(toks, m.zero(1))["logits"])
    finally:
        run.gate.set()
        b.close()


def test_no_added_wait_at_concurrency_one(models):
    """A lone request never waits for a batch that cannot fill, even with a long
    queue delay configured."""
    m = models["lstm"]
    b = Batcher("lstm", m.run, m.io, max_batch_size=32, max_queue_delay_us=3_000_000)
    try:
        toks = np.ones((1, 8), np.int64)
        t0 = time.monotonic()
        for _ in range(3):
            b.submit(Work(toks, m.zero(1))).result(timeout=30)
        assert time.monotonic() - t0 < 3.0       # one 3 s delay would exceed this
        assert b.stats.execution_count == 3
    finally:
        b.close()


def test_inline_runs_on_the_callers_thread_only_when_idle(models):
    """A blocking caller at concurrency 1 runs its own work (no hand-off); when the
    model is busy the work queues and is batched as usual."""
    m = models["lstm"]
    seen = []

    def run(feeds):
        seen.append(threading.current_thread().name)
        return m.run(feeds)

    gated = GatedRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=8)
    try:
        toks = np.ones((1, 6), np.int64)
        fut = b.submit(Work(toks, m.zero(1)), inline=True)
        assert fut.done() and seen == [threading.current_thread().name]
        np.testing.assert_array_equal(fut.result()["logits"], m.alone(toks, m.zero(1))["logits"])
    finally:
        b.close()
    b = Batcher("lstm", gated, m.io, max_batch_size=8)
    try:
        first = b.submit(Work(toks, m.zero(1)))          # the scheduler thread takes it
        assert gated.entered.wait(10)
        queued = b.submit(Work(toks, m.zero(1)), inline=True)
        assert not queued.done() and b.queue_depth() == 1  # busy: it queued instead of running
        gated.gate.set()
        first.result(timeout=30)
        queued.result(timeout=30)
        assert b.stats.execution_count == 2
    finally:
        gated.gate.set()
        b.close()


class CountingRun:
    """The real session run, counting the runs in progress at once; each run waits at its own
    gate (a semaphore release lets one run through)."""

    def __init__(self, model: Model):
        self.model, self.gate = model, threading.Semaphore(0)
        self.lock, self.running, self.peak, self.rows = threading.Lock(), 0, 0, []

    def __call__(self, feeds):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.rows.append(int(feeds["tokens"].shape[0]))
        try:
            assert self.gate.acquire(timeout=30), "the test never let this run through"
            return self.model.run(feeds)
        finally:
            with self.lock:
                self.running -= 1

    def wait_running(self, n: int, timeout: float = 10.0) -> bool:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            with self.lock:
                if self.running >= n:
                    return True
            time.sleep(0.005)
        return False


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_bound_the_runs_in_progress(models, instances):
    """--instances N: up to N onnxruntime runs of one model at once, each on its own batch;
    beyond that, work queues. Every answer still equals the request run alone."""
    m = models["lstm"]
    run = CountingRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=8, max_queue_delay_us=0, instances=instances)
    try:
        toks = [np.full((1, 4), i, np.int64) for i in range(3)]
        futs = [b.submit(Work(toks[0], m.zero(1)))]
        assert run.wait_running(1)
        futs.append(b.submit(Work(toks[1], m.zero(1))))
        assert run.wait_running(instances)        # a second scheduler took it, if there is one
        time.sleep(0.1)
        assert run.running == instances and b.queue_depth() == 2 - instances
        futs.append(b.submit(Work(toks[2], m.zero(1))))
        for _ in range(3):
            run.gate.release()
        for t, fut in zip(toks, futs):
            np.testing.assert_array_equal(fut.result(timeout=30)["logits"], m.alone(t, m.zero(1))["logits"])
        assert run.peak == instances
    finally:
        for _ in range(3):
            run.gate.release()
        b.close()
    with pytest.raises(ValueError):
        Batcher("lstm", m.run, m.io, instances=0)


def test_work_queued_during_a_run_goes_without_the_queue_delay(models):
    """The queue delay is only for an idle model about to see a burst: work that queued while a
    run was in progress goes the moment the model is free, even when recent batches were bigger."""
    m = models["lstm"]
    run = CountingRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=8, max_queue_delay_us=3_000_000)
    try:
        toks = np.ones((1, 5), np.int64)
        first = b.submit(Work(toks, m.zero(1)))
        assert run.wait_running(1)
        four = [b.submit(Work(toks, m.zero(1))) for _ in range(4)]   # queue while the model is busy
        run.gate.release()
        first.result(timeout=30)
        assert run.wait_running(1)                 # the four went at once, as one batch
        assert run.rows == [1, 4]
        late = b.submit(Work(toks, m.zero(1)))     # recent batches held 4 rows; this one is alone
        t0 = time.monotonic()
        run.gate.release()
        run.gate.release()
        for fut in four + [late]:
            fut.result(timeout=30)
        assert time.monotonic() - t0 < 2.0         # the 3 s delay for 3 more rows was not taken
        assert run.rows == [1, 4, 1]
    finally:
        for _ in range(3):
            run.gate.release()
        b.close()


def test_inline_only_while_recent_runs_held_one_row(models):
    """A caller that finds the model idle runs inline only while recent runs held a single row:
    under load (recent runs batched more) it queues, so rows arriving right behind it can share
    its run; once eight runs in a row held one row, callers run inline again."""
    m = models["lstm"]
    threads = []

    def run(feeds):
        threads.append(threading.current_thread().name)
        return m.run(feeds)

    b = Batcher("lstm", run, m.io, max_batch_size=8, max_queue_delay_us=0)
    try:
        me = threading.current_thread().name
        b.submit(Work(np.ones((3, 5), np.int64), m.zero(3)), inline=True).result(timeout=30)
        toks = np.ones((1, 5), np.int64)
        for _ in range(9):
            b.submit(Work(toks, m.zero(1)), inline=True).result(timeout=30)
        assert threads[0] == me                                    # nothing recent: inline
        assert all(t.startswith("batcher-lstm-") for t in threads[1:9])  # a 3-row run is recent
        assert threads[9] == me                                    # eight 1-row runs since
    finally:
        b.close()


def test_the_next_run_does_not_wait_for_callers_to_be_completed(models):
    """Finished runs are handed to the batcher's completion thread: a slow completion (here a
    caller's done-callback that blocks) does not hold up the next run."""
    m = models["lstm"]
    run = CountingRun(m)
    b = Batcher("lstm", run, m.io, max_batch_size=1)
    release = threading.Event()
    try:
        toks = np.ones((1, 5), np.int64)
        first = b.submit(Work(toks, m.zero(1)))
        first.add_done_callback(lambda _f: release.wait(30))
        second = b.submit(Work(toks, m.zero(1)))
        run.gate.release()                                   # the first run goes through
        until = time.monotonic() + 10
        while len(run.rows) < 2 and time.monotonic() < until:
            time.sleep(0.005)
        assert run.rows == [1, 1]        # the second run started while the first's callback blocks
        release.set()
        run.gate.release()
        np.testing.assert_array_equal(second.result(timeout=30)["logits"], m.alone(toks, m.zero(1))["logits"])
        np.testing.assert_array_equal(first.result(timeout=30)["logits"], m.alone(toks, m.zero(1))["logits"])
    finally:
        release.set()
        run.gate.release()
        run.gate.release()
        b.close()


def test_a_run_that_outlives_close_still_answers_its_caller(models):
    """close() stops the completion thread after its timeout; a run still in progress then
    completes its own callers."""
    m = models["lstm"]
    run = GatedRun(m)
    b = Batcher("lstm", run, m.io)
    try:
        toks = np.ones((1, 5), np.int64)
        fut = b.submit(Work(toks, m.zero(1)))
        assert run.entered.wait(10)
        b.close(timeout=0.1)
        run.gate.set()
        np.testing.assert_array_equal(fut.result(timeout=30)["logits"], m.alone(toks, m.zero(1))["logits"])
    finally:
        run.gate.set()
        b.close()
