"""Sequences that survive: state in Redis, shared by replicas, steps applied exactly once.

Real parts only: a redis-server on a free loopback port (tests/cluster.py), `rnnserve-server`
replicas as subprocesses with --state-store redis://..., tritonclient.grpc and RnnClient.
A sequence is streamed in chunks (one step per chunk, the step id in the request `id` or the
`sequence_step` parameter); its joined logits must equal the whole sequence run at once.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from rnnserve.serve.rnnclient import SEQUENCE_HEADER, RnnClient
from tests.cluster import Replica, start_replicas

MODEL = "charlm"
CHUNK, CHUNKS, BATCH = 6, 8, 2
ATOL = 1e-5


@pytest.fixture(scope="module")
def cluster(charlm_repo, redis_server, tmp_path_factory):
    """Two replicas sharing the Redis store; a test that stops one starts it again."""
    replicas = start_replicas(charlm_repo, tmp_path_factory.mktemp("replicas"), redis_server.url, n=2)
    yield replicas
    for r in replicas:
        r.kill()


@pytest.fixture
def replicas(cluster, redis_server):
    if redis_server.proc is None:
        redis_server.start()
    for r in cluster:
        if not r.alive():
            r.start()
    return cluster


def tokens_for(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32, size=(BATCH, CHUNK * CHUNKS), dtype=np.int64)


def whole(address: str, tokens: np.ndarray) -> np.ndarray:
    with RnnClient(address) as client:
        return client.infer(MODEL, tokens, outputs=["logits"])["logits"]


def chunk(tokens: np.ndarray, i: int) -> np.ndarray:
    return tokens[:, i * CHUNK:(i + 1) * CHUNK]


def step_rnn(address: str, seq_id, tokens: np.ndarray, i: int, timeout: float = 20) -> np.ndarray:
    """Step i of the sequence through RnnClient (the step id in `sequence_step`)."""
    with RnnClient(address, timeout=timeout) as client:
        return client.infer(MODEL, chunk(tokens, i), sequence_id=seq_id, start=i == 0, end=i == CHUNKS - 1,
                            step=i, outputs=["logits"])["logits"]


def step_triton(address: str, seq_id, tokens: np.ndarray, i: int) -> np.ndarray:
    """Step i through tritonclient: the step id in the request id, the locality header in headers=."""
    x = tc.InferInput("tokens", [BATCH, CHUNK], "INT64")
    x.set_data_from_numpy(np.ascontiguousarray(chunk(tokens, i)))
    client = tc.InferenceServerClient(address)
    try:
        result = client.infer(MODEL, [x], outputs=[tc.InferRequestedOutput("logits")], request_id=str(i),
                              sequence_id=seq_id, sequence_start=i == 0, sequence_end=i == CHUNKS - 1,
                              headers={SEQUENCE_HEADER: str(seq_id)}, client_timeout=20)
        return result.as_numpy("logits")
    finally:
        client.close()


def assert_whole(replicas, tokens, parts) -> None:
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole(replicas[0].address, tokens), atol=ATOL)


def rpc_error(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


def test_chunks_alternate_between_replicas(replicas):
    tokens = tokens_for(1)
    parts = []
    for i in range(CHUNKS):   # even steps on replica 0 through tritonclient, odd on replica 1 through ours
        if i % 2 == 0:
            parts.append(step_triton(replicas[0].address, 101, tokens, i))
        else:
            parts.append(step_rnn(replicas[1].address, 101, tokens, i))
    assert_whole(replicas, tokens, parts)


def test_repeat_gap_and_string_ids(replicas, redis_server):
    tokens = tokens_for(2)
    a, b = (r.address for r in replicas)
    first = step_rnn(a, "user-7", tokens, 0)
    second = step_rnn(a, "user-7", tokens, 1)
    np.testing.assert_array_equal(step_rnn(b, "user-7", tokens, 1), second)   # a retry elsewhere: the kept answer
    err = rpc_error(step_rnn, b, "user-7", tokens, 4)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "got step 4, the server expects step 2" in err.details()
    err = rpc_error(step_rnn, a, "user-7", tokens_for(3), 1)   # the same id with other inputs
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "other inputs" in err.details()
    parts = [first, second] + [step_rnn(a if i % 3 else b, "user-7", tokens, i) for i in range(2, CHUNKS)]
    assert_whole(replicas, tokens, parts)
    with redis_server.client() as r:   # the END is kept (for its retry) until the idle timeout
        assert r.ttl(f"rnnserve:seq:{MODEL}:s:user-7") > 0


def test_kill_9_mid_sequence(replicas):
    """kill -9 the replica running a step; the client retries that step on the other one and
    gets it exactly once, whether or not the dead replica had applied it."""
    tokens = tokens_for(4)
    a, b = replicas
    parts = [step_rnn(a.address, 202, tokens, i) for i in range(3)]
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(step_rnn, a.address, 202, tokens, 3, 5)
        a.kill()
        try:
            in_flight.result()
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    parts.append(step_rnn(b.address, 202, tokens, 3))            # the retry
    np.testing.assert_array_equal(step_rnn(b.address, 202, tokens, 3), parts[-1])   # and again: not re-applied
    parts += [step_rnn(b.address, 202, tokens, i) for i in range(4, CHUNKS)]
    assert_whole([b], tokens, parts)


def test_sigterm_drain_mid_sequence(replicas):
    """SIGTERM while a step is in flight: the replica finishes it (or refuses it, UNAVAILABLE,
    if it arrived after the drain began) and exits 0; the client goes on with the other one,
    repeating that step, which is then answered exactly once."""
    tokens = tokens_for(5)
    a, b = replicas
    parts = [step_rnn(a.address, 303, tokens, i) for i in range(3)]
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(step_rnn, a.address, 303, tokens, 3)
        assert a.terminate() == 0
        try:
            drained = in_flight.result()
        except grpc.RpcError as e:
            # UNAVAILABLE from the drain; a call whose connection reaches the process only as
            # grpc.aio itself stops (past the drain's settle time, on a loaded machine) is
            # CANCELLED by gRPC. Neither applied the step: the retry below must run it once.
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e.details()
            drained = None
    parts.append(step_rnn(b.address, 303, tokens, 3))
    if drained is not None:
        np.testing.assert_array_equal(parts[-1], drained)
    parts += [step_rnn(b.address, 303, tokens, i) for i in range(4, CHUNKS)]
    assert_whole([b], tokens, parts)


def test_both_replicas_restarted(replicas):
    tokens = tokens_for(6)
    parts = [step_rnn(replicas[i % 2].address, 404, tokens, i) for i in range(3)]
    for r in replicas:
        assert r.terminate() == 0
    for r in replicas:
        r.start()
    parts += [step_triton(replicas[i % 2].address, 404, tokens, i) for i in range(3, CHUNKS)]
    assert_whole(replicas, tokens, parts)


def test_redis_down_then_back(replicas, redis_server):
    tokens = tokens_for(7)
    a, b = (r.address for r in replicas)
    parts = [step_rnn(a, 505, tokens, i) for i in range(3)]
    redis_server.stop()
    t0 = time.monotonic()
    for address in (a, b):   # held in memory (a) or not (b): refused, quickly, nothing applied
        err = rpc_error(step_rnn, address, 505, tokens, 3)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert "state store" in err.details() and "unreachable" in err.details()
    assert time.monotonic() - t0 < 10
    redis_server.start()   # back, empty: replica a still holds the state and writes it through again
    parts.append(step_rnn(a, 505, tokens, 3))
    parts += [step_rnn(b, 505, tokens, i) for i in range(4, CHUNKS)]
    assert_whole(replicas, tokens, parts)


def test_idle_timeout_is_the_ttl(charlm_repo, redis_server, tmp_path):
    if redis_server.proc is None:
        redis_server.start()
    a, b = start_replicas(charlm_repo, tmp_path, redis_server.url, n=2, extra=["--sequence-idle-timeout-s", "1"])
    try:
        tokens = tokens_for(8)
        step_rnn(a.address, 606, tokens, 0)
        with redis_server.client() as r:
            assert 0 < r.pttl(f"rnnserve:seq:{MODEL}:i:606") <= 1000
        time.sleep(1.6)
        for address in (a.address, b.address):
            err = rpc_error(step_rnn, address, 606, tokens, 1)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "START is required" in err.details()
        with redis_server.client() as r:
            assert not r.exists(f"rnnserve:seq:{MODEL}:i:606")
    finally:
        a.kill()
        b.kill()


def test_bad_state_store_flag_exits_2(charlm_repo, tmp_path):
    r = Replica("bad", charlm_repo, tmp_path, ["--state-store", "mysql://x"])
    r.launch()
    assert r.proc.wait(60) == 2
    assert "--state-store must be 'memory' or redis://" in r.log.read_text()


def test_tritonclient_errors_keep_their_codes(replicas):
    x = tc.InferInput("tokens", [BATCH, CHUNK], "INT64")
    x.set_data_from_numpy(chunk(tokens_for(9), 0))
    client = tc.InferenceServerClient(replicas[0].address)
    with pytest.raises(InferenceServerException, match="START is required"):
        client.infer(MODEL, [x], sequence_id=999_999, request_id="3")
    client.close()


def test_cli_steps_across_replicas(replicas):
    """rnnserve-client infer --sequence-id/--start/--end/--step: a step on each replica, and a
    repeat answered from the kept answer."""
    def cli(address, *args):
        res = subprocess.run([sys.executable, "-m", "rnnserve.serve.client", "--address", address, "--json",
                              "infer", MODEL, "--tokens", "1,2,3", "--sequence-id", "cli-1", *args],
                             capture_output=True, text=True, timeout=60)
        return res.returncode, json.loads(res.stdout)
    a, b = (r.address for r in replicas)
    assert cli(a, "--start", "--step", "0")[0] == 0
    code, first = cli(b, "--step", "1")
    assert code == 0 and cli(a, "--step", "1") == (0, first)
    code, out = cli(b, "--step", "5", "--end")
    assert code == 1 and out["error"]["code"] == "FAILED_PRECONDITION"
    assert cli(a, "--step", "2", "--end")[0] == 0


def step_rows(address: str, ids: list[int], tokens: np.ndarray, i: int, start=None, end=None) -> np.ndarray:
    """Chunk i of each row's sequence in one request (the sequence_id / _start / _end inputs)."""
    n = len(ids)
    start = [i == 0] * n if start is None else start
    end = [i == CHUNKS - 1] * n if end is None else end
    arrays = [("tokens", np.ascontiguousarray(chunk(tokens, i)), "INT64"),
              ("sequence_id", np.array(ids, np.uint64), "UINT64"),
              ("sequence_start", np.array(start), "BOOL"), ("sequence_end", np.array(end), "BOOL")]
    inputs = []
    for name, array, datatype in arrays:
        inputs.append(tc.InferInput(name, list(array.shape), datatype))
        inputs[-1].set_data_from_numpy(array)
    client = tc.InferenceServerClient(address)
    try:
        return client.infer(MODEL, inputs, outputs=[tc.InferRequestedOutput("logits")]).as_numpy("logits")
    finally:
        client.close()


def test_many_sequence_requests_across_replicas(replicas, redis_server):
    """Rows of four sequences per request: three chunks on replica a (each request one unit,
    written through), three on b (loaded from Redis), the rest on a again (its copies are
    stale: the writes conflict, each row is reloaded and run again). Each row equals its
    sequence sent whole. A row for a sequence whose END is stored fails the request naming
    the row; the other row is applied."""
    ids = [7001, 7002, 7003, 7004]
    tokens = np.random.default_rng(10).integers(0, 32, size=(len(ids), CHUNK * CHUNKS), dtype=np.int64)
    a, b = (r.address for r in replicas)
    parts = [step_rows(a if i < 3 or i >= 6 else b, ids, tokens, i) for i in range(CHUNKS)]
    assert_whole(replicas, tokens, parts)
    with redis_server.client() as r:
        assert all(r.exists(f"rnnserve:seq:{MODEL}:i:{k}") for k in ids)   # the ENDs are kept for a retry
    with pytest.raises(InferenceServerException) as info:
        step_rows(a, [7001, 7005], tokens[:2], 1, [False, True], [False, False])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "row 0: sequence 7001 has ended" in info.value.message()
    last = step_rows(b, [7005], tokens[1:2], 2, [False], [True])     # 7005's START was applied
    whole_two = whole(a, np.ascontiguousarray(tokens[1:2, CHUNK:3 * CHUNK]))
    np.testing.assert_allclose(last, whole_two[:, CHUNK:], atol=ATOL)
