"""Dynamic batching and server-side sequences over real exported models and
real onnxruntime sessions: exactness (no gRPC here; tests/serve/test_sequences_grpc.py goes
over the wire). Scheduling and threads: tests/serve/test_batcher_scheduling.py."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.sequences import SequenceManager
from rnnserve.serve.errors import InvalidArgument, Unavailable
from tests.batching_models import ARCHS, UNIDIRECTIONAL, Runs, build_models, work


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("batching"))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_equals_alone(models, arch):
    """Concurrent requests of mixed lengths and states, merged by the batcher,
    give each request exactly what it gets when run alone."""
    m = models[arch]
    rng = np.random.default_rng(1)
    runs = Runs()
    b = Batcher(arch, m.run, m.io, max_batch_size=16, max_queue_delay_us=2000, on_run=runs)
    try:
        works = []
        for i in range(40):
            rows, T = int(rng.integers(1, 4)), int(rng.integers(1, 30))
            works.append(work(rng.integers(0, 12, (rows, T)).astype(np.int64),
                              m.rand_state(rng, rows), need_state=bool(i % 3 == 0)))
        for w in works:
            b.submit(w)
        for w in works:
            got = w.future.result(timeout=30)
            ref = m.alone(w.inputs["tokens"], w.states)
            assert got["logits"].shape == ref["logits"].shape
            np.testing.assert_allclose(got["logits"], ref["logits"], rtol=0, atol=1e-6)
            if w.need_state:
                for name in m.io.state_outputs:
                    np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-6)
        # The work really was merged: fewer runs than requests.
        assert runs.execution_count < len(works)
        assert runs.inference_count == sum(w.rows for w in works)
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
                futs.append(sm.submit(("s", chunk), {"tokens": piece}, start=pos == 0,
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
    runs = Runs()
    b = Batcher("lstm", m.run, m.io, max_batch_size=32, on_run=runs)
    sm = SequenceManager("lstm", b, m.io, m.zero)
    rng = np.random.default_rng(3)
    seqs = {i: rng.integers(0, 12, (1, 40)).astype(np.int64) for i in range(16)}
    results = {}

    def stream(i):
        futs = [sm.submit(i, {"tokens": seqs[i][:, t:t + 1]}, start=t == 0, end=t == 39) for t in range(40)]
        results[i] = np.concatenate([f.result(timeout=60)["logits"] for f in futs], axis=1)

    try:
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(stream, seqs))
        for i, toks in seqs.items():
            np.testing.assert_allclose(results[i], m.alone(toks, m.zero(1))["logits"], rtol=0, atol=1e-5)
        # Steps of different sequences shared runs.
        assert runs.execution_count < 16 * 40
        assert max(runs.batch_sizes) > 1
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
        first = sm.submit("x", {"tokens": toks[:, :4]}, start=True, end=False, client_states=h0).result(timeout=30)
        second = sm.submit("x", {"tokens": toks[:, 4:]}, start=False, end=False).result(timeout=30)
        ref = m.alone(toks, h0)
        np.testing.assert_allclose(np.concatenate([first["logits"], second["logits"]], 1),
                                   ref["logits"], atol=1e-5, rtol=0)
        # Unknown sequence without START.
        with pytest.raises(InvalidArgument, match="START is required"):
            sm.submit("nope", {"tokens": toks}, start=False, end=False)
        # State inputs only with START.
        with pytest.raises(InvalidArgument, match="only be sent with sequence_start"):
            sm.submit("x", {"tokens": toks}, start=False, end=False, client_states=h0)
        # Capacity: "x" is live, "y" fills it, "z" is refused without evicting anything.
        sm.submit("y", {"tokens": toks}, start=True, end=False).result(timeout=30)
        with pytest.raises(Unavailable, match="too many live sequences"):
            sm.submit("z", {"tokens": toks}, start=True, end=False)
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
        with pytest.raises(InvalidArgument, match="no state inputs"):
            sm.submit(1, {"tokens": np.zeros((1, 3), np.int64)}, start=True, end=False)
    finally:
        sm.close()
        b.close()
