"""Issue 4 through the DataPlane: dynamic batching of concurrent requests, server-side
sequences (Triton semantics), text streams, backpressure, deadlines and statistics.
Real exported models, real onnxruntime; no gRPC here (the front end's tests go over the wire).

"Alone" references are the same request sent through the same DataPlane with nothing
else in flight (the batcher then runs it by itself)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rnnserve.serve.engine.model_engine import wait
from rnnserve.serve.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from rnnserve.serve.wire.types import InferRequest
from rnnserve.train.model import PRESET_NAMES
from tests.fixtures import copy_repo, make_dataplane

LONG = (1, 150000)   # one row (tight_dp: batch <= 1) that keeps the charlm model busy for ~0.3 s or more


def infer(dp, model, inputs, **kw):
    return dict(dp.infer(InferRequest(model_name=model, inputs=inputs, **kw)).outputs)


def seq_params(seq_id, start=False, end=False):
    return {"sequence_id": seq_id, "sequence_start": start, "sequence_end": end}


def totals(dp, model):
    [s] = dp.model_statistics(model, dp.engine(model).inst.version)
    return s


@pytest.fixture(scope="module")
def tight_dp(charlm_repo):
    """One request per run, 2 queue slots, 2 live sequences: limits are easy to reach. Whole runs
    (max_run_bytes 0): the LONG request is one run, with no time chunks that others could slip between."""
    dp = make_dataplane(charlm_repo, warmup=False, max_seq_len=LONG[1], max_batch_size=1, max_queue_size=2,
                        max_sequences=2, max_run_bytes=0)
    yield dp
    dp.close()


def busy(dp):
    """Start a long request and wait until the scheduler is running it (the queue is then empty)."""
    fut = dp.infer_async(InferRequest(model_name="charlm", inputs={"tokens": np.zeros(LONG, np.int64)},
                                      requested_outputs=["hn"]))
    engine = dp.engine("charlm")
    deadline = time.monotonic() + 10
    while engine.batcher.queue_depth() and time.monotonic() < deadline:
        time.sleep(0.001)
    return fut


# -- stateless batching -------------------------------------------------------------------------------
def test_concurrent_infers_equal_alone_and_share_runs(charlm_dataplane):
    dp, model = charlm_dataplane, "charlm"
    inst = dp.engine(model).inst
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(48):
        inputs = {"tokens": rng.integers(0, inst.vocab_size, (1, int(rng.integers(1, 40)))).astype(np.int64)}
        if i % 3 == 0:
            inputs |= {n: rng.standard_normal(inst.state_shape(1)).astype(np.float32) for n in inst.state_inputs}
        reqs.append((inputs, None if i % 2 else ["logits"]))
    alone = [infer(dp, model, x, requested_outputs=o) for x, o in reqs]
    alone = [a for i in range(12) for a in alone[i::12]]

    def client(chunk, gate):
        gate.wait()
        return [infer(dp, model, x, requested_outputs=o) for x, o in chunk]

    # Whether 12 blocking callers overlap is up to the OS scheduler (on a loaded 2-core machine
    # they may all find the model idle and run inline, one at a time), so a burst is repeated
    # until one shares a run; every burst must be exact and counted.
    for _attempt in range(5):
        before = totals(dp, model)
        gate = threading.Barrier(12)
        with ThreadPoolExecutor(12) as ex:
            got = [r for part in ex.map(client, [reqs[i::12] for i in range(12)], [gate] * 12) for r in part]
        for a, g in zip(alone, got):
            assert list(a) == list(g)
            for name in a:
                assert g[name].shape == a[name].shape
                np.testing.assert_allclose(g[name], a[name], rtol=0, atol=1e-6)
        after = totals(dp, model)
        assert after.inference_count - before.inference_count == len(reqs)
        if after.execution_count - before.execution_count < len(reqs):
            break
    assert after.execution_count - before.execution_count < len(reqs)       # runs were shared
    merged = {k: v.count - before.batch_stats.get(k, type(v)()).count for k, v in after.batch_stats.items()}
    assert any(size > 1 and n > 0 for size, n in merged.items())            # every request had 1 row
    assert after.queue.count > before.queue.count and after.queue.ns >= before.queue.ns
    # perf_analyzer refuses statistics whose compute counts differ; batching must not make them.
    assert after.queue.count == after.compute_input.count == after.compute_infer.count == \
        after.compute_output.count



def test_an_inline_run_counts_as_compute_infer_not_compute_input(tight_dp):
    """At concurrency 1 the caller's thread runs the model itself: that time is compute_infer;
    compute_input is only validation and queueing."""
    dp, model = tight_dp, "charlm"
    tokens = {"tokens": np.zeros((1, 2000), np.int64)}
    for _ in range(9):   # eight 1-row runs in a row: the next lone request runs inline
        infer(dp, model, tokens)
    before = totals(dp, model)
    infer(dp, model, tokens)
    after = totals(dp, model)
    compute_input = after.compute_input.ns - before.compute_input.ns
    compute_infer = after.compute_infer.ns - before.compute_infer.ns
    assert compute_infer > 0 and compute_input < compute_infer / 4


# -- sequences ------------------------------------------------------------------------------------------
SEQ_MODELS = [("hello_dataplane", p) for p in PRESET_NAMES] + [("charlm_dataplane", "charlm"),
                                                               ("charlm_dataplane", "chargru")]


@pytest.mark.parametrize("fixture, model", SEQ_MODELS)
def test_sequence_chunks_equal_whole(request, fixture, model):
    """Chunks of 1, 3 and 17 streamed through server-side state give the logits (and final state)
    of sending the sequence whole. Chunks 1 and 3 are pipelined, interleaved, through infer_async
    (their steps share runs); chunk 17 uses the blocking infer with an integer id."""
    dp = request.getfixturevalue(fixture)
    inst = dp.engine(model).inst
    tokens = np.random.default_rng(len(model)).integers(0, inst.vocab_size, (1, 40)).astype(np.int64)
    whole = infer(dp, model, {"tokens": tokens})
    pieces = {c: [(p, tokens[:, p:p + c]) for p in range(0, 40, c)] for c in (1, 3, 17)}
    futs = {1: [], 3: []}
    for i in range(40):
        for c in (1, 3):
            if i < len(pieces[c]):
                p, chunk = pieces[c][i]
                params = seq_params(f"{model}/{c}", start=p == 0, end=p + c >= 40)
                futs[c].append(dp.infer_async(InferRequest(model_name=model, inputs={"tokens": chunk},
                                                           parameters=params)))
    outs = {c: [dict(f.result(timeout=60).outputs) for f in fs] for c, fs in futs.items()}
    outs[17] = [infer(dp, model, {"tokens": chunk}, parameters=seq_params(2**63 + 17, p == 0, p + 17 >= 40))
                for p, chunk in pieces[17]]
    for c, out in outs.items():
        logits = np.concatenate([o["logits"] for o in out], axis=1)
        np.testing.assert_allclose(logits, whole["logits"], rtol=0, atol=1e-5, err_msg=f"chunk {c}")
        for name in inst.state_outputs:
            np.testing.assert_allclose(out[-1][name], whole[name], rtol=0, atol=1e-5)
    assert dp.live_sequences(model) == 0        # every END freed its state


def test_sequence_rules(charlm_dataplane):
    dp, model = charlm_dataplane, "charlm"
    inst = dp.engine(model).inst
    rng = np.random.default_rng(1)
    toks = rng.integers(0, inst.vocab_size, (2, 12)).astype(np.int64)
    with pytest.raises(InvalidArgument, match="START is required"):
        infer(dp, model, {"tokens": toks}, parameters=seq_params("never-started"))
    fut = dp.infer_async(InferRequest(model_name=model, inputs={"tokens": toks}, parameters=seq_params(99)))
    with pytest.raises(InvalidArgument, match="START is required"):    # infer_async: errors in the future
        fut.result(timeout=10)
    with pytest.raises(NotFound):
        dp.infer_async(InferRequest(model_name="nope", inputs={"tokens": toks})).result(timeout=10)
    # START from a state the client sends (batch 2); later steps continue from the server's copy.
    h0 = rng.standard_normal(inst.state_shape(2)).astype(np.float32)
    first = infer(dp, model, {"tokens": toks[:, :5], "h0": h0}, parameters=seq_params("s", start=True))
    assert dp.live_sequences(model) == 1
    with pytest.raises(InvalidArgument, match="only be sent with sequence_start"):
        infer(dp, model, {"tokens": toks[:, 5:], "h0": h0}, parameters=seq_params("s"))
    second = infer(dp, model, {"tokens": toks[:, 5:]}, parameters=seq_params("s", end=True),
                   requested_outputs=["logits"])
    assert list(second) == ["logits"]
    ref = infer(dp, model, {"tokens": toks, "h0": h0})   # c0 omitted: zeros, as in the sequence
    np.testing.assert_allclose(np.concatenate([first["logits"], second["logits"]], 1), ref["logits"],
                               rtol=0, atol=1e-5)
    assert dp.live_sequences(model) == 0
    with pytest.raises(InvalidArgument, match="START is required"):     # END freed it
        infer(dp, model, {"tokens": toks}, parameters=seq_params("s"))
    with pytest.raises(InvalidArgument, match="need a non-zero 'sequence_id'"):
        infer(dp, model, {"tokens": toks}, parameters={"sequence_start": True})


def test_bidirectional_refuses_sequences_and_streams(charlm_dataplane):
    with pytest.raises(InvalidArgument, match="'bigru' is bidirectional.*sequence"):
        infer(charlm_dataplane, "bigru", {"tokens": np.ones((1, 4), np.int64)}, parameters=seq_params(5, True))
    with pytest.raises(InvalidArgument, match="'bigru' is bidirectional"):
        charlm_dataplane.open_text_stream("bigru")
    assert infer(charlm_dataplane, "bigru", {"tokens": np.ones((1, 4), np.int64)})["logits"].shape == (1, 4, 32)


def test_max_sequences_unavailable_nothing_evicted(tight_dp):
    dp, toks = tight_dp, np.ones((1, 3), np.int64)
    infer(dp, "charlm", {"tokens": toks}, parameters=seq_params("a", start=True))
    infer(dp, "charlm", {"tokens": toks}, parameters=seq_params("b", start=True))
    with pytest.raises(Unavailable, match="too many live sequences"):
        infer(dp, "charlm", {"tokens": toks}, parameters=seq_params("c", start=True))
    with pytest.raises(Unavailable, match="too many live sequences"):
        dp.open_text_stream("charlm")
    assert dp.live_sequences("charlm") == 2
    infer(dp, "charlm", {"tokens": toks}, parameters=seq_params("a", end=True))     # "a" still there
    infer(dp, "charlm", {"tokens": toks}, parameters=seq_params("c", start=True, end=True))
    with dp.open_text_stream("charlm") as stream:
        assert dp.live_sequences("charlm") == 2 and stream.feed("ab").decoded
    infer(dp, "charlm", {"tokens": toks}, parameters=seq_params("b", end=True))
    assert dp.live_sequences("charlm") == 0


# -- backpressure, deadlines, cancellation --------------------------------------------------------------
def test_queue_full_deadline_and_cancel(tight_dp):
    dp, toks = tight_dp, np.ones((1, 4), np.int64)
    ref = infer(dp, "charlm", {"tokens": toks})
    long = busy(dp)
    # Queued behind the long run: one expires, one is cancelled while its caller waits.
    late = dp.infer_async(InferRequest(model_name="charlm", inputs={"tokens": toks},
                                       deadline=time.monotonic() + 0.002))
    flag = threading.Event()
    with ThreadPoolExecutor(1) as ex:
        waiting = ex.submit(infer, dp, "charlm", {"tokens": toks}, is_cancelled=flag.is_set)
        while dp.engine("charlm").batcher.queue_depth() < 2 and not long.done():
            time.sleep(0.001)
        # The queue (2 slots) is full: refused at once, nothing grows.
        full = dp.infer_async(InferRequest(model_name="charlm", inputs={"tokens": toks}))
        with pytest.raises(Unavailable, match="queue full"):
            full.result(timeout=1)
        with pytest.raises(Unavailable, match="queue full"):
            infer(dp, "charlm", {"tokens": toks})
        flag.set()
        with pytest.raises(Cancelled):
            waiting.result(timeout=30)
    assert not long.done()              # all of the above happened while the long run was in progress
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=30)
    assert long.result(timeout=30).outputs[0][1].shape == (2, LONG[0], 16)
    # After the burst the model serves normally.
    np.testing.assert_array_equal(infer(dp, "charlm", {"tokens": toks})["logits"], ref["logits"])


def test_timeout_parameter_and_expired_deadline(tight_dp):
    dp, toks = tight_dp, np.ones((1, 4), np.int64)
    with pytest.raises(DeadlineExceeded):
        infer(dp, "charlm", {"tokens": toks}, deadline=time.monotonic() - 1)
    long = busy(dp)
    with pytest.raises(DeadlineExceeded):           # 1 ms budget, ~0.1 s behind the long run
        infer(dp, "charlm", {"tokens": toks}, parameters={"timeout": 1000})
    with pytest.raises(DeadlineExceeded):           # a sequence step is dropped the same way
        infer(dp, "charlm", {"tokens": toks}, parameters={"timeout": 1000, **seq_params("t", start=True)})
    long.result(timeout=30)
    infer(dp, "charlm", {"tokens": toks}, parameters=seq_params("t", start=True, end=True))
    assert dp.live_sequences("charlm") == 0


# -- text -----------------------------------------------------------------------------------------------
def test_concurrent_generates_equal_alone(charlm_dataplane):
    dp = charlm_dataplane
    jobs = [dict(prompt=p, seed=s, temperature=t) for s, (p, t) in
            enumerate([("the ", 1.0), ("a cat", 0.8), ("hello", 0), ("x", 1.3)] * 3)]

    def gen(job):
        return "".join(e.text for e in dp.generate("charlm", job["prompt"], 30, temperature=job["temperature"],
                                                   seed=job["seed"]))
    alone = [gen(j) for j in jobs]
    engine = dp.engine("charlm")

    def gen_together(job, gate):
        gate.wait()
        return gen(job)

    for _attempt in range(5):   # overlap is up to the OS scheduler: see the stateless test above
        runs = engine.counters.snapshot().execution_count
        gate = threading.Barrier(len(jobs))
        with ThreadPoolExecutor(len(jobs)) as ex:
            together = list(ex.map(gen_together, jobs, [gate] * len(jobs)))
        assert together == alone
        if engine.counters.snapshot().execution_count - runs < 30 * len(jobs):
            break
    # steps of different generates shared runs
    assert engine.counters.snapshot().execution_count - runs < 30 * len(jobs)


@pytest.mark.parametrize("fixture, model, text", [
    ("hello_dataplane", "emb-lstm", "hellohelloheolleh"), ("hello_dataplane", "rnncell", "hello" * 5),
    ("charlm_dataplane", "charlm", "the quick brown fox jumps over the lazy dog."),
    ("charlm_dataplane", "chargru", "streaming text, one chunk at a time!")])
def test_text_stream_equals_predict(request, fixture, model, text):
    dp = request.getfixturevalue(fixture)
    whole = dp.predict_text(model, text, top_k=3)
    for chunk in (1, 3, 17):
        with dp.open_text_stream(model, top_k=3) as stream:
            parts = [stream.feed(text[i:i + chunk]) for i in range(0, len(text), chunk)]
            assert dp.live_sequences(model) == 1
        assert dp.live_sequences(model) == 0
        got = [p for part in parts for p in part.positions]
        assert "".join(part.decoded for part in parts) == whole.decoded
        assert [(p.index, p.input_char, p.char) for p in got] == \
            [(p.index, p.input_char, p.char) for p in whole.positions]
        for g, w in zip(got, whole.positions):
            assert [c.char for c in g.top] == [c.char for c in w.top]
            np.testing.assert_allclose([c.prob for c in g.top], [c.prob for c in w.top], rtol=0, atol=1e-5)
    with dp.open_text_stream(model) as stream:
        assert stream.feed("").positions == []            # an empty chunk predicts nothing
        with pytest.raises(InvalidArgument, match="not in the vocabulary"):
            stream.feed("\x00")
        assert stream.feed(text[:2]).positions[1].index == 1
    with pytest.raises(InvalidArgument, match="closed"):
        stream.feed(text)


# -- configuration, reload ----------------------------------------------------------------------------
def test_model_config_reports_batching_and_sequence_state(charlm_dataplane):
    cfg = charlm_dataplane.model_config("charlm")
    assert cfg.max_batch_size == 0
    assert cfg.dynamic_batching == {"preferred_batch_size": [32], "max_queue_delay_microseconds": 500}
    assert cfg.sequence_batching["max_sequence_idle_microseconds"] == 60_000_000
    assert [(s.input_name, s.output_name, s.datatype, s.dims) for s in cfg.sequence_batching["states"]] == [
        ("h0", "hn", "FP32", [2, -1, 16]), ("c0", "cn", "FP32", [2, -1, 16])]
    assert [(t.name, t.optional) for t in cfg.inputs] == [("tokens", False), ("h0", True), ("c0", True),
                                                           ("sequence_id", True), ("sequence_start", True),
                                                           ("sequence_end", True)]
    gru = charlm_dataplane.model_config("chargru").sequence_batching["states"]
    assert [(s.input_name, s.output_name, s.dims) for s in gru] == [("h0", "hn", [1, -1, 12])]
    bi = charlm_dataplane.model_config("bigru")
    assert bi.sequence_batching is None and bi.dynamic_batching is not None


def test_reload_retires_old_engine_after_inflight_work(charlm_repo, tmp_path):
    dp = make_dataplane(copy_repo(charlm_repo, str(tmp_path / "repo")), warmup=False, model_control_mode="explicit")
    try:
        old = dp.engine("charlm")
        stream = dp.generate("charlm", "abc", 20, temperature=0)
        first = [next(stream) for _ in range(3)]
        text = dp.open_text_stream("charlm")
        dp.admin.load_model("charlm")                     # reload: a new engine serves new requests
        assert dp.engine("charlm") is not old and not old.closed
        rest = list(stream)                         # in-flight work finishes on the old version
        assert len(first + rest) == 20 and not old.closed
        assert text.feed("more").model_version == "2" and not old.closed
        text.close()
        deadline = time.monotonic() + 10
        while not old.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert old.closed
        with pytest.raises(Unavailable, match="unloaded"):
            wait(*old.submit(np.ones((1, 2), np.int64), old.zero_states(1), False))
        assert infer(dp, "charlm", {"tokens": np.ones((1, 2), np.int64)})["logits"].shape == (1, 2, 32)
        dp.admin.unload_model("chargru")
        assert dp.live_sequences("chargru") == 0
    finally:
        dp.close()
