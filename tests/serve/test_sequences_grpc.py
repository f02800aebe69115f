"""Server-side sequences and dynamic batching over the wire, driven by tritonclient.grpc
unchanged: `infer(..., sequence_id=, sequence_start=, sequence_end=)` and the stream API
(`start_stream` / `async_stream_infer`, pipelined). Streaming a sequence in chunks equals
sending it whole; errors carry Triton's status codes; ModelConfig and ModelStatistics say
what the scheduler does. A real server on 127.0.0.1:0 serves the session's repositories."""
from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.fixtures import HELLO_MODELS, serving

UNIDIRECTIONAL = [("hello", m) for m in HELLO_MODELS] + [("charlm", "charlm"), ("charlm", "chargru")]
SEQ_LEN = 40
ATOL = 1e-5


@pytest.fixture(scope="module")
def servers(hello_repo, charlm_repo):
    with serving(hello_repo) as (hello, hello_addr), serving(charlm_repo) as (charlm, charlm_addr):
        yield {"hello": (hello, hello_addr), "charlm": (charlm, charlm_addr)}


@pytest.fixture(scope="module")
def clients(servers):
    made = {k: tc.InferenceServerClient(addr) for k, (_, addr) in servers.items()}
    yield made
    for c in made.values():
        c.close()


def _tokens_input(tokens: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    return tensor


def _state_names(client, model) -> list[str]:
    return [o.name for o in client.get_model_metadata(model).outputs if o.name != "logits"]


def _random_tokens(client, model, seed: int, length: int = SEQ_LEN, batch: int = 1) -> np.ndarray:
    vocab = client.infer(model, [_tokens_input(np.zeros((1, 1), np.int64))]).as_numpy("logits").shape[-1]
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def _whole(client, model, tokens) -> dict:
    result = client.infer(model, [_tokens_input(tokens)])
    return {name: result.as_numpy(name) for name in ["logits"] + _state_names(client, model)}


def _in_chunks(client, model, tokens, size: int, seq_id) -> dict:
    """One sequence, `size` tokens per unary request; -> logits joined, final state."""
    n = tokens.shape[1]
    logits, last = [], None
    for start in range(0, n, size):
        last = client.infer(model, [_tokens_input(tokens[:, start:start + size])],
                            sequence_id=seq_id, sequence_start=start == 0,
                            sequence_end=start + size >= n)
        logits.append(last.as_numpy("logits"))
    got = {"logits": np.concatenate(logits, axis=1)}
    got.update({name: last.as_numpy(name) for name in _state_names(client, model)})
    return got


def _assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)


def _error(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


# ---- exactness -------------------------------------------------------------------------------

@pytest.mark.parametrize("repo,model", UNIDIRECTIONAL)
def test_chunks_equal_whole(servers, clients, repo, model):
    client = clients[repo]
    tokens = _random_tokens(client, model, seed=len(model))
    want = _whole(client, model, tokens)
    for i, size in enumerate((1, 3, 17)):
        _assert_close(_in_chunks(client, model, tokens, size, seq_id=1000 + i), want)
    _assert_close(_in_chunks(client, model, tokens, 17, seq_id=f"{model}-string-id"), want)
    assert servers[repo][0].dataplane.live_sequences(model) == 0   # END freed every one


def test_batch_rows_in_a_sequence(clients):
    client = clients["charlm"]
    tokens = _random_tokens(client, "charlm", seed=5, batch=3)
    _assert_close(_in_chunks(client, "charlm", tokens, 7, seq_id=77), _whole(client, "charlm", tokens))


def test_start_restarts_from_zero_or_client_state(clients):
    client = clients["charlm"]
    tokens = _random_tokens(client, "charlm", seed=6, length=10)
    want = _whole(client, "charlm", tokens)
    client.infer("charlm", [_tokens_input(tokens[:, :4])], sequence_id=5, sequence_start=True)
    again = client.infer("charlm", [_tokens_input(tokens)], sequence_id=5, sequence_start=True,
                         sequence_end=True)     # START on a live id begins again from zeros
    np.testing.assert_allclose(again.as_numpy("logits"), want["logits"], atol=ATOL, rtol=0)
    head = _whole(client, "charlm", tokens[:, :4])
    states = []
    for name in ("h0", "c0"):
        state = tc.InferInput(name, list(head[name.replace("0", "n")].shape), "FP32")
        state.set_data_from_numpy(head[name.replace("0", "n")])
        states.append(state)
    tail = client.infer("charlm", [_tokens_input(tokens[:, 4:]), *states], sequence_id=6,
                        sequence_start=True, sequence_end=True)
    np.testing.assert_allclose(tail.as_numpy("logits"), want["logits"][:, 4:], atol=ATOL, rtol=0)


# ---- errors ---------------------------------------------------------------------------------

def test_unknown_sequence_needs_start(clients):
    client = clients["charlm"]
    tokens = _tokens_input(np.array([[1, 2]], np.int64))
    for seq_id in (424242, "never-started"):
        err = _error(client.infer, "charlm", [tokens], sequence_id=seq_id)
        assert err.status() == "StatusCode.INVALID_ARGUMENT" and "START" in err.message()
    client.infer("charlm", [tokens], sequence_id=31, sequence_start=True, sequence_end=True)
    err = _error(client.infer, "charlm", [tokens], sequence_id=31)   # END freed it
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "START" in err.message()


def test_bidirectional_refuses_sequences(clients):
    err = _error(clients["charlm"].infer, "bigru", [_tokens_input(np.array([[1, 2]], np.int64))],
                 sequence_id=1, sequence_start=True)
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "bidirectional" in err.message()


def test_max_live_sequences(charlm_repo):
    tokens = [_tokens_input(np.array([[1, 2]], np.int64))]
    with serving(charlm_repo, max_sequences=2) as (_, address), \
            tc.InferenceServerClient(address) as client:
        client.infer("chargru", tokens, sequence_id=1, sequence_start=True)
        client.infer("chargru", tokens, sequence_id="two", sequence_start=True)
        err = _error(client.infer, "chargru", tokens, sequence_id=3, sequence_start=True)
        assert err.status() == "StatusCode.UNAVAILABLE" and "too many live sequences" in err.message()
        client.infer("chargru", tokens, sequence_id=1)              # nothing was evicted
        client.infer("chargru", tokens, sequence_id=1, sequence_end=True)
        client.infer("chargru", tokens, sequence_id=3, sequence_start=True, sequence_end=True)


def _heavy(rows: int = 3000, seq: int = 64) -> list:
    return [_tokens_input(np.random.default_rng(rows).integers(0, 32, size=(rows, seq)))]


def test_queue_full_is_unavailable(charlm_repo):
    """max_queue_size 1, no merging (two requests never fit one batch): concurrent heavy requests
    overflow the queue at once."""
    with serving(charlm_repo, max_queue_size=1, max_batch_size=3000) as (_, address), \
            tc.InferenceServerClient(address) as client:
        answers: queue.Queue = queue.Queue()
        heavy = _heavy()
        for _ in range(12):
            client.async_infer("charlm", heavy, lambda result, error: answers.put(error),
                               outputs=[tc.InferRequestedOutput("hn")])
        errors = [answers.get(timeout=120) for _ in range(12)]
    failed = [e for e in errors if e is not None]
    assert failed and len(failed) < 12
    assert all(e.status() == "StatusCode.UNAVAILABLE" and "queue full" in e.message() for e in failed)


def test_deadline_exceeded_before_running(charlm_repo):
    """A request whose gRPC deadline has passed before it can run gets DEADLINE_EXCEEDED and
    never runs (inference_count counts only the other requests' rows): one already expired
    on arrival (a 1 µs deadline on a 10 MB request), one that expires while it waits in the
    queue behind heavy runs."""
    # max_run_bytes 0: each heavy request is one run (no time chunks that the small one could slip between)
    with serving(charlm_repo, max_batch_size=20000, max_run_bytes=0) as (_, address), \
            tc.InferenceServerClient(address) as client:
        def stats():
            return client.get_inference_statistics("chargru").model_stats[0].inference_count
        before = stats()
        big = _heavy(rows=20000)
        for _ in range(3):
            err = _error(client.infer, "chargru", big, client_timeout=1e-6)
            assert err.status() == "StatusCode.DEADLINE_EXCEEDED"
        answers: queue.Queue = queue.Queue()
        for _ in range(3):      # about 0.1 s of compute each, one at a time
            client.async_infer("chargru", _heavy(rows=2000), lambda result, error: answers.put(error),
                               outputs=[tc.InferRequestedOutput("hn")])
        time.sleep(0.01)
        small = [_tokens_input(np.array([[1, 2, 3]], np.int64))]
        err = _error(client.infer, "chargru", small, client_timeout=0.05)
        assert err.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert [answers.get(timeout=120) for _ in range(3)] == [None] * 3
        time.sleep(0.2)
        assert stats() - before == 3 * 2000
        client.infer("chargru", small, client_timeout=30)
        assert stats() - before == 3 * 2000 + 1


# ---- the stream API, pipelined ----------------------------------------------------------------

def test_stream_pipelines_interleaved_sequences(servers, clients):
    client = clients["charlm"]
    plan = {11: ("charlm", 1), "seq-b": ("charlm", 3), 13: ("chargru", 17), 14: ("charlm", 5)}
    tokens = {sid: _random_tokens(client, model, seed=i + 20) for i, (sid, (model, _)) in enumerate(plan.items())}
    wants = {sid: _whole(client, model, tokens[sid]) for sid, (model, _) in plan.items()}
    requests = []   # (request id, sequence id, model, tokens slice, start, end), interleaved
    cursors = {sid: 0 for sid in plan}
    while any(cursors[sid] < SEQ_LEN for sid in plan):
        for sid, (model, size) in plan.items():
            at = cursors[sid]
            if at < SEQ_LEN:
                requests.append((f"{sid}/{at}", sid, model, tokens[sid][:, at:at + size], at == 0,
                                 at + size >= SEQ_LEN))
                cursors[sid] = at + size
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request_id, sid, model, chunk, start, end in requests:     # no waiting between them
            client.async_stream_infer(model, [_tokens_input(chunk)], request_id=request_id,
                                      sequence_id=sid, sequence_start=start, sequence_end=end)
        client.async_stream_infer("charlm", [_tokens_input(np.array([[1]], np.int64))],
                                  request_id="orphan", sequence_id=999)
        client.async_stream_infer("chargru", [_tokens_input(np.array([[2, 3]], np.int64))],
                                  request_id="last")
        replies = [answers.get(timeout=120) for _ in range(len(requests) + 2)]
    finally:
        client.stop_stream()
    results = {}
    for result, error in replies:
        if error is not None:
            assert "START" in error.message() and "'orphan'" in error.message()
            continue
        results[result.get_response().id] = result
    assert set(results) == {r[0] for r in requests} | {"last"}
    for sid in plan:
        mine = [results[r[0]] for r in requests if r[1] == sid]
        got = {"logits": np.concatenate([r.as_numpy("logits") for r in mine], axis=1)}
        got.update({n: mine[-1].as_numpy(n) for n in wants[sid] if n != "logits"})
        _assert_close(got, wants[sid])
    for model in ("charlm", "chargru"):
        assert servers["charlm"][0].dataplane.live_sequences(model) == 0


def test_stream_answers_in_request_order(clients):
    """Non-decoupled, as Triton: answers come back in request order, errors in their place."""
    client = clients["hello"]
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(20):
            ids = np.array([[i % 4] * (1 + 3 * (i % 5))], np.int64) if i % 7 != 3 else np.array([[9]])
            client.async_stream_infer("emb-gru", [_tokens_input(ids)], request_id=str(i))
        replies = [answers.get(timeout=60) for _ in range(20)]
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(replies):
        if i % 7 == 3:
            assert result is None and f"request '{i}'" in error.message() and "out of range" in error.message()
        else:
            assert error is None and result.get_response().id == str(i)


# ---- what the server reports -------------------------------------------------------------------

@pytest.mark.parametrize("repo,model", UNIDIRECTIONAL + [("charlm", "bigru")])
def test_model_config_scheduling(clients, repo, model):
    client = clients[repo]
    config = client.get_model_config(model).config
    states = _state_names(client, model)
    if model == "bigru":
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert not states and config.dynamic_batching.preferred_batch_size
        return
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    seq = config.sequence_batching
    assert [(s.input_name, s.output_name) for s in seq.state] == \
        [(o.replace("n", "0"), o) for o in states]
    dims = {i.name: list(i.dims) for i in config.input}
    for s in seq.state:
        assert list(s.dims) == dims[s.input_name] and s.data_type == tc.model_config_pb2.TYPE_FP32
        assert s.initial_state[0].zero_data
    assert seq.max_sequence_idle_microseconds > 0
    assert seq.oldest.preferred_batch_size and seq.oldest.max_queue_delay_microseconds >= 0


def test_statistics_show_batches_after_concurrent_load(clients, servers):
    client = clients["charlm"]
    answers: queue.Queue = queue.Queue()
    rng = np.random.default_rng(9)
    # All 64 in the queue before any runs (a busy machine could otherwise run each as it arrives).
    batcher = servers["charlm"][0].dataplane.engine("chargru").batcher
    batcher.hold()
    try:
        for i in range(64):         # stateless and sequence steps, all in flight at once
            tokens = [_tokens_input(rng.integers(0, 32, size=(1, 8)))]
            if i % 2:
                client.async_infer("chargru", tokens, lambda result, error: answers.put(error),
                                   sequence_id=500 + i, sequence_start=True, sequence_end=True)
            else:
                client.async_infer("chargru", tokens, lambda result, error: answers.put(error))
        until = time.monotonic() + 60
        while batcher.queue_depth() < 64 and time.monotonic() < until:
            time.sleep(0.01)
    finally:
        batcher.release()
    assert [answers.get(timeout=120) for _ in range(64)] == [None] * 64
    stats = client.get_inference_statistics("chargru").model_stats[0]
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert max(sizes) > 1, sizes
    assert stats.execution_count == sum(sizes.values()) < stats.inference_count
    inf = stats.inference_stats
    assert inf.queue.count == inf.compute_input.count == inf.compute_infer.count == \
        inf.compute_output.count
