"""The server's event loop (serve/eventloop.py): uvloop by default where it is installed
(rnnserve depends on it off Windows), the standard library's asyncio loop on request; a real
server on each answers unary and streamed sequence requests exactly as the other does."""
from __future__ import annotations

import asyncio
import queue

import numpy as np
import pytest
import tritonclient.grpc as tc
import uvloop

from rnnserve.serve.eventloop import new_event_loop, resolve
from rnnserve.serve.settings import ServeSettings
from tests.fixtures import serving

MODEL = "emb-lstm"
TOKENS = np.array([[1, 0, 2, 2, 3]], np.int64)   # "hello" in the seed vocabulary


def _tokens(tokens: np.ndarray) -> list[tc.InferInput]:
    tensor = tc.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(tokens)
    return [tensor]


def _streamed(client: tc.InferenceServerClient, seq_id: int) -> np.ndarray:
    """The sequence one token per streamed request; -> the logits of every step [1, T, V]."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        n = TOKENS.shape[1]
        for t in range(n):
            client.async_stream_infer(MODEL, _tokens(TOKENS[:, t:t + 1]), request_id=str(t), sequence_id=seq_id,
                                      sequence_start=t == 0, sequence_end=t == n - 1)
        replies = [answers.get(timeout=60) for _ in range(n)]
    finally:
        client.stop_stream()
    assert all(error is None for _, error in replies), replies
    return np.concatenate([result.as_numpy("logits") for result, _ in replies], axis=1)


@pytest.mark.parametrize("kind,expected,loop_type", [("auto", "uvloop", uvloop.Loop),
                                                     ("uvloop", "uvloop", uvloop.Loop),
                                                     ("asyncio", "asyncio", asyncio.BaseEventLoop)])
def test_each_loop_serves_the_same_answers(hello_repo, kind, expected, loop_type):
    with serving(hello_repo, event_loop=kind) as (server, address):
        assert server.event_loop == expected
        assert isinstance(server._loop, loop_type)
        assert isinstance(server._loop, uvloop.Loop) == (expected == "uvloop")
        with tc.InferenceServerClient(address) as client:
            assert client.is_server_live()
            whole = client.infer(MODEL, _tokens(TOKENS)).as_numpy("logits")
            assert whole.shape[:2] == (1, TOKENS.shape[1])
            np.testing.assert_allclose(_streamed(client, 7), whole, rtol=0, atol=1e-5)
            assert "".join("ehlo"[i] for i in whole[0].argmax(-1)) == "ohlol"


def test_names_resolve_and_a_wrong_one_stops_the_start():
    assert resolve("auto") == "uvloop" and resolve("asyncio") == "asyncio"
    loop = new_event_loop("asyncio")
    try:
        assert not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    with pytest.raises(ValueError, match="event loop must be one of auto, uvloop, asyncio"):
        resolve("trio")
    problems = dict(ServeSettings(repository="r", event_loop="trio").problems())
    assert "auto, uvloop, asyncio" in problems["event_loop"]
