"""Repository changes while serving: --poll-interval and RepositoryModelLoad/Unload.

A real server (127.0.0.1:0, poll every 0.2 s) over a temp copy of the session's
charlm repository; clients are tritonclient and our own stubs. Versions are
published the way export/publish.py does it: written under REPO/.staging-*/ and
renamed into REPO/<model>/<version>/ in one step.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.fixtures import copy_repo, serving

TOKENS = np.array([[1, 5, 9, 13, 2, 7]], dtype=np.int64)
POLL_S = 0.2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- helpers ---------------------------------------------------------------------------------------
def model_file(repo: str, model: str, version) -> str:
    return os.path.join(repo, model, str(version), "model.onnx")


def publish(repo: str, model: str, version, src: str = "", content: bytes = b"") -> None:
    """A new version appears whole: staged in a hidden folder, then one rename."""
    staging = tempfile.mkdtemp(prefix=".staging-", dir=repo)
    if src:
        shutil.copyfile(src, os.path.join(staging, "model.onnx"))
    else:
        with open(os.path.join(staging, "model.onnx"), "wb") as f:
            f.write(content)
    os.makedirs(os.path.join(repo, model), exist_ok=True)
    os.rename(staging, os.path.join(repo, model, str(version)))


def replace_file(repo: str, model: str, version, src: str = "", content: bytes = b"") -> None:
    """A version's model.onnx is replaced in place (os.replace of a hidden temp file)."""
    dst = model_file(repo, model, version)
    tmp = os.path.join(os.path.dirname(dst), ".model.onnx.tmp")
    if src:
        shutil.copyfile(src, tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(content)
    os.replace(tmp, dst)


def remove(repo: str, *parts: str) -> None:
    """A folder vanishes at once (renamed away, then deleted), as export/publish.py prunes."""
    gone = os.path.join(repo, ".removed-" + "-".join(parts))
    os.rename(os.path.join(repo, *parts), gone)
    shutil.rmtree(gone)


def wait_for(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (InferenceServerException, grpc.RpcError):   # e.g. health does not know the model yet
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def infer(client: tc.InferenceServerClient, model: str, version: str = ""):
    """-> (the version that answered, logits)."""
    tokens = tc.InferInput("tokens", list(TOKENS.shape), "INT64")
    tokens.set_data_from_numpy(TOKENS)
    result = client.infer(model, [tokens], model_version=version,
                          outputs=[tc.InferRequestedOutput("logits")])
    return result.get_response().model_version, result.as_numpy("logits")


def status_of(call, *args, **kwargs) -> str:
    """The status a tritonclient call ends with: "OK" or e.g. "StatusCode.NOT_FOUND"."""
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return exc.status()
    return "OK"


def index(client: tc.InferenceServerClient) -> dict:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


@pytest.fixture
def repo(charlm_repo, tmp_path) -> str:
    return copy_repo(charlm_repo, str(tmp_path / "repo"))


@pytest.fixture
def polled(repo):
    """A server polling `repo` every POLL_S seconds; yields (server, tritonclient, channel)."""
    with serving(repo, model_control_mode="poll", poll_interval=POLL_S) as (server, address), \
            grpc.insecure_channel(address) as ch:
        client = tc.InferenceServerClient(address)
        try:
            yield server, client, ch
        finally:
            client.close()


# -- tests -----------------------------------------------------------------------------------------
def test_new_versions_are_picked_up_and_failures_keep_the_rest_serving(repo, polled):
    _, client, ch = polled
    _, gru_v1 = infer(client, "chargru")
    _, lstm_v1 = infer(client, "charlm", "1")
    assert not np.array_equal(gru_v1, lstm_v1)

    # version 2 of chargru: the file of charlm version 1
    publish(repo, "chargru", 2, src=model_file(repo, "charlm", 1))
    wait_for(lambda: infer(client, "chargru")[0] == "2", "chargru version 2 to serve")
    version, logits = infer(client, "chargru")
    assert version == "2" and np.array_equal(logits, lstm_v1)
    assert np.array_equal(infer(client, "chargru", "1")[1], gru_v1)   # the old version stays addressable
    assert client.get_model_metadata("chargru").versions == ["1", "2"]

    # a corrupt version 3 and a version 4 without our metadata whose state pairs are ambiguous
    # (h0 -> hn or h0_out): UNAVAILABLE with the reason
    publish(repo, "chargru", 3, content=b"this is not an onnx file")
    proto = onnx.load(model_file(repo, "charlm", 2))
    del proto.metadata_props[:]
    for node in proto.graph.node:
        node.output[:] = ["h0_out" if n == "cn" else n for n in node.output]
    next(o for o in proto.graph.output if o.name == "cn").name = "h0_out"
    publish(repo, "chargru", 4, content=proto.SerializeToString())
    wait_for(lambda: index(client).get(("chargru", "4"), ("",))[0] == "UNAVAILABLE", "version 4 to fail")
    entries = index(client)
    assert entries[("chargru", "3")][0] == "UNAVAILABLE" and "failed to load" in entries[("chargru", "3")][1]
    assert entries[("chargru", "4")][0] == "UNAVAILABLE" and "'h0' could pair" in entries[("chargru", "4")][1]
    assert "config.pbtxt" in entries[("chargru", "4")][1]
    assert entries[("chargru", "2")] == ("READY", "") and entries[("charlm", "2")] == ("READY", "")
    assert infer(client, "chargru")[0] == "2" and client.is_model_ready("chargru")
    assert not client.is_model_ready("chargru", "3")
    assert status_of(infer, client, "chargru", "3") == "StatusCode.UNAVAILABLE"
    assert infer(client, "charlm")[0] == "2" and infer(client, "bigru")[0] == "1"

    # A failed file is retried when it changes.
    replace_file(repo, "chargru", 3, src=model_file(repo, "charlm", 2))
    wait_for(lambda: infer(client, "chargru")[0] == "3", "the repaired version 3 to serve")
    assert np.array_equal(infer(client, "chargru")[1], infer(client, "charlm", "2")[1])

    # a new model folder is picked up too
    publish(repo, "newgru", 1, src=model_file(repo, "chargru", 1))
    wait_for(lambda: client.is_model_ready("newgru"), "the new model")
    health = health_pb2_grpc.HealthStub(ch)
    wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="newgru")).status == SERVING,
             "the new model's health")
    assert np.array_equal(infer(client, "newgru")[1], gru_v1)


def test_changed_file_switches_after_warmup_and_inflight_work_finishes_on_the_old(repo, polled):
    server, client, ch = polled
    address = server.address
    text = tpb_grpc.TextServiceStub(ch)
    first, second = "the quick brown ", "fox jumps"
    reference = text.Predict(tpb.PredictRequest(model="chargru", text=first + second), timeout=30)
    _, old_logits = infer(client, "chargru")
    old_engine = server.dataplane.engine("chargru")

    # An open text stream (state on the server) holds the old instance.
    answers = []
    more = threading.Event()

    def requests():
        yield tpb.StreamRequest(model="chargru", text=first)
        more.wait(60)
        yield tpb.StreamRequest(text=second)

    stream = text.Stream(requests(), timeout=60)
    answers.append(next(stream))

    # Unversioned requests keep flowing through the switch: none fails, and once the new file
    # answers, the old one never answers again.
    seen, errors, stop = [], [], threading.Event()

    def hammer():
        own = tc.InferenceServerClient(address)
        try:
            while not stop.is_set():
                try:
                    seen.append(np.array_equal(infer(own, "chargru")[1], old_logits))
                except InferenceServerException as exc:
                    errors.append(exc)
        finally:
            own.close()

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        wait_for(lambda: seen, "the first answers")
        replace_file(repo, "chargru", 1, src=model_file(repo, "charlm", 1))
        wait_for(lambda: not np.array_equal(infer(client, "chargru")[1], old_logits), "the changed file")
        time.sleep(3 * POLL_S)
    finally:
        stop.set()
        worker.join(30)
    assert not errors, errors[:3]
    assert True in seen and False in seen and seen == sorted(seen, reverse=True), "switched back and forth"
    assert np.array_equal(infer(client, "chargru")[1], infer(client, "charlm", "1")[1])

    # The stream's next chunk still runs on the old file, then the old engine closes.
    assert not old_engine.closed
    more.set()
    answers.append(next(stream))
    assert [a.version for a in answers] == ["1", "1"]
    assert answers[1].decoded == reference.decoded[len(first):]
    for got, want in zip(answers[1].positions, reference.positions[len(first):]):
        assert got.char == want.char and got.prob == pytest.approx(want.prob, abs=1e-5)
    assert list(stream) == []
    wait_for(lambda: old_engine.closed, "the old engine to close after its stream")

    # A broken replacement of a serving version: the previous file keeps serving, the index says why.
    _, new_logits = infer(client, "chargru")
    replace_file(repo, "chargru", 1, content=b"garbage")
    state, reason = wait_for(lambda: index(client)[("chargru", "1")][1] and index(client)[("chargru", "1")],
                             "the failed reload in the index")
    assert state == "READY" and "still serving the previously loaded file" in reason
    assert np.array_equal(infer(client, "chargru")[1], new_logits)


def test_removed_models_and_versions_are_not_found(repo, polled):
    server, client, ch = polled
    health = health_pb2_grpc.HealthStub(ch)
    def check(name):
        return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
    assert check("bigru") == SERVING and client.is_model_ready("bigru")

    remove(repo, "bigru")
    wait_for(lambda: status_of(infer, client, "bigru") == "StatusCode.NOT_FOUND", "bigru to be gone")
    assert "bigru" not in {name for name, _ in index(client)}
    wait_for(lambda: check("bigru") == NOT_SERVING, "bigru's health to follow")
    assert check("charlm") == SERVING and infer(client, "chargru")[0] == "1"

    remove(repo, "charlm", "2")
    wait_for(lambda: infer(client, "charlm")[0] == "1", "charlm version 1 to answer")
    assert status_of(infer, client, "charlm", "2") == "StatusCode.NOT_FOUND"
    assert client.get_model_metadata("charlm").versions == ["1"]

    # Poll mode: the folder decides what is loaded; load and unload requests are refused (Triton).
    assert status_of(client.unload_model, "chargru") == "StatusCode.PERMISSION_DENIED"
    assert status_of(client.load_model, "chargru") == "StatusCode.PERMISSION_DENIED"
    assert client.is_model_ready("chargru")


def test_load_and_unload_rpcs_without_polling(repo):
    with serving(repo, model_control_mode="explicit") as (server, address), grpc.insecure_channel(address) as ch:
        client = tc.InferenceServerClient(address)
        health = health_pb2_grpc.HealthStub(ch)
        try:
            _, gru_v1 = infer(client, "chargru")
            client.unload_model("chargru")
            assert not client.is_model_ready("chargru")
            assert index(client)[("chargru", "1")] == ("UNLOADED", "unloaded by request")
            assert status_of(infer, client, "chargru") == "StatusCode.UNAVAILABLE"
            assert health.Check(health_pb2.HealthCheckRequest(service="chargru")).status == NOT_SERVING

            publish(repo, "chargru", 2, src=model_file(repo, "charlm", 2))
            time.sleep(2 * POLL_S)
            assert not client.is_model_ready("chargru")          # no polling: nothing happens
            client.load_model("chargru")
            assert infer(client, "chargru")[0] == "2" and np.array_equal(infer(client, "chargru", "1")[1], gru_v1)
            assert health.Check(health_pb2.HealthCheckRequest(service="chargru")).status == SERVING

            # A version that fails: the load reports it, the other versions serve.
            publish(repo, "chargru", 3, content=b"not onnx")
            assert status_of(client.load_model, "chargru") == "StatusCode.UNAVAILABLE"
            assert index(client)[("chargru", "3")][0] == "UNAVAILABLE" and infer(client, "chargru")[0] == "2"

            assert status_of(client.load_model, "nope") == "StatusCode.NOT_FOUND"
            assert status_of(client.unload_model, "nope") == "StatusCode.NOT_FOUND"
            remove(repo, "bigru")                                  # gone from disk: load says NOT_FOUND
            assert status_of(client.load_model, "bigru") == "StatusCode.NOT_FOUND"
            assert status_of(infer, client, "bigru") == "StatusCode.NOT_FOUND"
        finally:
            client.close()
