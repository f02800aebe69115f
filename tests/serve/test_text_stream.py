"""TextService.Stream over the wire: text chunks in, each chunk's predictions out, the state
kept on the server. Feeding a text in chunks gives what Predict gives on the whole text.
A real server on 127.0.0.1:0 serves the session's hello and charlm repositories."""
from __future__ import annotations

import json
import queue
import subprocess
import sys

import grpc
import numpy as np
import pytest

from rnnserve.serve.client import RnnClient
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.fixtures import CHARLM_VOCAB, HELLO_MODELS, ROOT, serving

TEXT = "the quick brown fox jumps over the lazy dog, twice!\nok."


@pytest.fixture(scope="module")
def hello_address(hello_server):
    return hello_server[1]


@pytest.fixture(scope="module")
def charlm_address(charlm_repo):
    with serving(charlm_repo) as (_, address):
        yield address


def _chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _assert_same(streamed: list[dict], whole: dict, atol: float = 1e-5) -> None:
    positions = [p for reply in streamed for p in reply["positions"]]
    assert [r["chunk"] for r in streamed] == list(range(len(streamed)))
    assert "".join(r["decoded"] for r in streamed) == whole["decoded"]
    assert len(positions) == len(whole["positions"])
    for got, want in zip(positions, whole["positions"]):
        assert (got["index"], got["input_char"], got["char"]) == \
            (want["index"], want["input_char"], want["char"])
        assert abs(got["prob"] - want["prob"]) <= atol
        assert [c["char"] for c in got["top"]] == [c["char"] for c in want["top"]]
        np.testing.assert_allclose([c["prob"] for c in got["top"]],
                                   [c["prob"] for c in want["top"]], atol=atol)


@pytest.mark.parametrize("model", HELLO_MODELS)
def test_hello_chunks_equal_predict(hello_address, model):
    with RnnClient(hello_address, timeout=30) as client:
        whole = client.predict(model, "hellohelloh", top_k=4)
        for size in (1, 2, 5):
            streamed = list(client.stream(model, _chunks("hellohelloh", size), top_k=4))
            assert len(streamed) == len(_chunks("hellohelloh", size))
            _assert_same(streamed, whole)
        first = next(client.stream(model, ["hello"]))
        assert first["decoded"] == client.predict(model, "hello")["decoded"]
        assert first["model"] == model and first["version"] == "1"


@pytest.mark.parametrize("model", ["charlm", "chargru"])
@pytest.mark.parametrize("size", [1, 3, 17])
def test_charlm_chunks_equal_predict(charlm_address, model, size):
    assert set(TEXT) <= set(CHARLM_VOCAB)
    with RnnClient(charlm_address, timeout=30) as client:
        whole = client.predict(model, TEXT, top_k=5)
        _assert_same(list(client.stream(model, _chunks(TEXT, size), top_k=5)), whole)


def test_versions_and_many_streams_at_once(charlm_address):
    """Interleaved streams of two versions each keep their own state."""
    with RnnClient(charlm_address, timeout=30) as client:
        iters, wants = [], []
        for version in ("1", "2", "1"):
            wants.append(client.predict("charlm", TEXT, version=version))
            iters.append(client.stream("charlm", iter(_chunks(TEXT, 7)), version=version))
        got = [[] for _ in iters]
        for _ in range(len(_chunks(TEXT, 7))):
            for i, it in enumerate(iters):
                got[i].append(next(it))
        for streamed, whole in zip(got, wants):
            _assert_same(streamed, whole)
        assert got[0][0]["version"] == "1" and got[1][0]["version"] == "2"


def test_first_message_may_only_open(charlm_address):
    with grpc.insecure_channel(charlm_address) as channel:
        stub = tpb_grpc.TextServiceStub(channel)
        replies = list(stub.Stream(iter([tpb.StreamRequest(model="chargru"),
                                         tpb.StreamRequest(text="ab"),
                                         tpb.StreamRequest(model="chargru", text="c")]),
                                   timeout=30))
        assert [r.chunk for r in replies] == [0, 1]
        assert [p.index for r in replies for p in r.positions] == [0, 1, 2]
        assert list(stub.Stream(iter([tpb.StreamRequest(model="chargru")]), timeout=30)) == []


def _stream_error(address: str, requests: list) -> tuple[grpc.StatusCode, str, int]:
    with grpc.insecure_channel(address) as channel:
        stub = tpb_grpc.TextServiceStub(channel)
        answered = 0
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Stream(iter(requests), timeout=30):
                answered += 1
        return info.value.code(), info.value.details(), answered


def test_errors_end_the_stream_with_a_status(charlm_address):
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    code, message, _ = _stream_error(charlm_address, [tpb.StreamRequest(model="bigru", text="ab")])
    assert code == invalid and "bidirectional" in message
    code, message, _ = _stream_error(charlm_address, [tpb.StreamRequest(model="nope", text="ab")])
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in message
    code, message, _ = _stream_error(charlm_address, [tpb.StreamRequest(text="ab")])
    assert code == invalid and "name the model" in message
    code, message, answered = _stream_error(
        charlm_address, [tpb.StreamRequest(model="charlm", text="ab"), tpb.StreamRequest(text="aBc")])
    assert code == invalid and "'B'" in message and answered == 1
    code, message, answered = _stream_error(
        charlm_address, [tpb.StreamRequest(model="charlm", text="ab"),
                         tpb.StreamRequest(model="chargru", text="c")])
    assert code == invalid and "cannot change" in message and answered == 1
    code, message, _ = _stream_error(
        charlm_address, [tpb.StreamRequest(model="charlm", text="ab"), tpb.StreamRequest()])
    assert code == invalid and "empty text chunk" in message


def test_streams_are_freed(charlm_address):
    """Every ended stream, ok or failed, gives its live-sequence slot back."""
    with RnnClient(charlm_address, timeout=30) as client:
        for _ in range(3):
            list(client.stream("charlm", ["ab", "cd"]))
    _stream_error(charlm_address, [tpb.StreamRequest(model="charlm", text="ab"),
                                   tpb.StreamRequest(text="A")])


def test_max_sequences_counts_open_streams(charlm_repo):
    chunks: queue.Queue = queue.Queue()

    def held_open():   # yields what the test puts in, until None
        while (chunk := chunks.get(timeout=30)) is not None:
            yield chunk

    with serving(charlm_repo, max_sequences=1) as (server, address), \
            RnnClient(address, timeout=30) as client:
        held = client.stream("chargru", held_open())
        chunks.put("ab")
        assert next(held)["chunk"] == 0
        assert server.dataplane.live_sequences("chargru") == 1
        code, message, _ = _stream_error(address, [tpb.StreamRequest(model="chargru", text="x")])
        assert code == grpc.StatusCode.UNAVAILABLE and "too many live sequences" in message
        chunks.put("cd")
        assert next(held)["chunk"] == 1
        chunks.put(None)
        with pytest.raises(StopIteration):
            next(held)
        assert server.dataplane.live_sequences("chargru") == 0
        assert next(client.stream("chargru", ["x"]))["chunk"] == 0


def test_cli_stream_reads_stdin_lines(hello_address):
    with RnnClient(hello_address, timeout=30) as client:
        want = client.predict("emb-lstm", "hello")["decoded"]
    proc = subprocess.run([sys.executable, "-m", "rnnserve.serve.client", "--address", hello_address,
                           "stream", "emb-lstm"], input="hel\nlo\n", capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"  0 'hel' -> {want[:3]!r}", f"  1 'lo' -> {want[3:]!r}"]
    proc = subprocess.run([sys.executable, "-m", "rnnserve.serve.client", "--address", hello_address,
                           "--json", "stream", "emb-lstm", "he", "llo"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["decoded"] == want and [c["chunk"] for c in out["chunks"]] == [0, 1]
