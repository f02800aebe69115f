"""Many sequences in one request, through tritonclient unchanged: the `sequence_id`,
`sequence_start` and `sequence_end` inputs give each row its own sequence. Every row
must equal that sequence run alone step by step in onnxruntime in this process; a
refused request changes no state."""
from __future__ import annotations

import os
import queue

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.fixtures import serving

VOCAB = 32   # tests.fixtures.CHARLM_VOCAB


@pytest.fixture(scope="module")
def server(charlm_repo):
    with serving(charlm_repo, max_sequences=12) as (srv, address):
        client = tc.InferenceServerClient(address)
        yield srv, client
        client.close()


class Reference:
    """Each sequence alone, one step at a time, in onnxruntime in this process."""

    def __init__(self, repo: str, model: str):
        newest = max(os.listdir(os.path.join(repo, model)), key=int)   # what the server serves
        self.session = ort.InferenceSession(os.path.join(repo, model, newest, "model.onnx"),
                                            providers=["CPUExecutionProvider"])
        self.state_inputs = [i for i in self.session.get_inputs() if i.name != "tokens"]
        self.states: dict = {}

    def step(self, seq, token: int, start: bool) -> np.ndarray:
        if start:
            self.states[seq] = [np.zeros((i.shape[0], 1, i.shape[2]), np.float32) for i in self.state_inputs]
        feeds = {"tokens": np.array([[token]], np.int64)}
        feeds.update({i.name: s for i, s in zip(self.state_inputs, self.states[seq])})
        logits, *states = self.session.run(None, feeds)
        self.states[seq] = states
        return logits[0]


def _inputs(ids, tokens, start=None, end=None, id_type="UINT64"):
    ids = np.array(ids, dtype=object if id_type == "BYTES" else np.uint64 if id_type == "UINT64" else np.int64)
    tensors = [("tokens", np.array(tokens, np.int64).reshape(len(tokens), -1), "INT64"),
               ("sequence_id", ids, id_type)]
    tensors += [(name, np.array(flags, bool), "BOOL") for name, flags in
                (("sequence_start", start), ("sequence_end", end)) if flags is not None]
    out = []
    for name, array, datatype in tensors:
        tensor = tc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def test_rows_of_many_sequences_equal_each_sequence_alone(server, charlm_repo):
    srv, client = server
    ref = Reference(charlm_repo, "charlm")
    rng = np.random.default_rng(7)
    spans = {seq: (seq % 3, seq % 3 + 3 + seq % 2) for seq in range(1, 9)}   # staggered starts and ends
    for t in range(max(last for _, last in spans.values()) + 1):
        rows = [seq for seq, (first, last) in spans.items() if first <= t <= last]
        rng.shuffle(rows)
        tokens = rng.integers(0, VOCAB, size=len(rows)).tolist()
        start = [spans[s][0] == t for s in rows]
        end = [spans[s][1] == t for s in rows]
        result = client.infer("charlm", _inputs(rows, tokens, start, end))
        logits = result.as_numpy("logits")
        assert logits.shape == (len(rows), 1, VOCAB) and result.as_numpy("hn").shape[1] == len(rows)
        for i, seq in enumerate(rows):
            np.testing.assert_allclose(logits[i], ref.step(seq, tokens[i], start[i]), atol=1e-5, rtol=0)
    assert srv.dataplane.live_sequences("charlm") == 0   # every END freed its sequence


def test_a_refused_request_changes_no_state(server, charlm_repo):
    srv, client = server
    ref = Reference(charlm_repo, "charlm")
    client.infer("charlm", _inputs([101, 102], [3, 4], start=[True, True]))
    ref.step(101, 3, True)
    ref.step(102, 4, True)
    cases = [
        (_inputs([101, 103], [5, 6]), ["row 1", "103", "START"]),          # a new id without START
        (_inputs([101, 101], [5, 6]), ["rows 0 and 1", "twice"]),            # an id twice
        (_inputs([101, 0], [5, 6], start=[False, True]), ["row 1", "sequence_id 0"]),
        (_inputs([101, 102], [5, 6], start=[False]), ["sequence_start", "shape [2]"]),
    ]
    for inputs, words in cases:
        with pytest.raises(InferenceServerException) as info:
            client.infer("charlm", inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert all(w in info.value.message() for w in words), info.value.message()
    assert srv.dataplane.live_sequences("charlm") == 2   # 103 was not started
    # 101 and 102 continue from where their last accepted step left them
    result = client.infer("charlm", _inputs([102, 101], [7, 8], end=[True, True]))
    np.testing.assert_allclose(result.as_numpy("logits")[0], ref.step(102, 7, False), atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.as_numpy("logits")[1], ref.step(101, 8, False), atol=1e-5, rtol=0)
    assert srv.dataplane.live_sequences("charlm") == 0


def test_max_sequences_holds_for_the_whole_request(server):
    srv, client = server
    with pytest.raises(InferenceServerException) as info:
        client.infer("charlm", _inputs(list(range(201, 214)), [1] * 13, start=[True] * 13))
    assert info.value.status() == "StatusCode.UNAVAILABLE" and "too many live sequences" in info.value.message()
    assert srv.dataplane.live_sequences("charlm") == 0


def test_bytes_ids_streamed_and_shared_with_the_parameter_form(server, charlm_repo):
    srv, client = server
    ref = Reference(charlm_repo, "chargru")
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("chargru", _inputs([b"alpha", b"beta"], [1, 2], start=[True, True],
                                                     id_type="BYTES"), request_id="r0")
        client.async_stream_infer("chargru", _inputs([b"beta", b"alpha"], [3, 4], end=[True, False],
                                                     id_type="BYTES"), request_id="r1")
        got = [answers.get(timeout=30) for _ in range(2)]
    finally:
        client.stop_stream()
    assert [e for _, e in got] == [None, None]
    first, second = (r.as_numpy("logits") for r, _ in got)
    np.testing.assert_allclose(first[0], ref.step("alpha", 1, True), atol=1e-5, rtol=0)
    np.testing.assert_allclose(first[1], ref.step("beta", 2, True), atol=1e-5, rtol=0)
    np.testing.assert_allclose(second[0], ref.step("beta", 3, False), atol=1e-5, rtol=0)
    np.testing.assert_allclose(second[1], ref.step("alpha", 4, False), atol=1e-5, rtol=0)
    # the string id "alpha" is one sequence in either form: the parameter form continues it
    single = _inputs([0], [5])[:1]
    result = client.infer("chargru", single, sequence_id="alpha", sequence_end=True)
    np.testing.assert_allclose(result.as_numpy("logits")[0], ref.step("alpha", 5, False), atol=1e-5, rtol=0)
    assert srv.dataplane.live_sequences("chargru") == 0


def test_announced_in_metadata(server):
    _, client = server
    assert "rnnserve_sequence_rows" in client.get_server_metadata().extensions
    inputs = {t.name: (t.datatype, list(t.shape)) for t in client.get_model_metadata("charlm").inputs}
    assert inputs["sequence_id"] == ("UINT64", [-1]) and inputs["sequence_start"] == ("BOOL", [-1])
    assert "sequence_id" not in {t.name for t in client.get_model_metadata("bigru").inputs}
    with pytest.raises(InferenceServerException) as info:   # bidirectional: no sequences at all
        client.infer("bigru", _inputs([1], [1], start=[True]))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "bidirectional" in info.value.message()
