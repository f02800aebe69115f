"""--model-control-mode and the repository's boundary: every traversal attempt over the wire,
symlinks out of the repository, odd version folders (the '²' folder), model control off by
default, and settings out of range refused before anything loads."""
from __future__ import annotations

import logging
import os
import shutil

import grpc
import pytest

from rnnserve.serve.admin.scan import is_version
from rnnserve.serve.frontend.server import create_server
from rnnserve.serve.settings import ServeSettings
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures import copy_repo, make_dataplane, serving

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _status(call, request) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=30)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture()
def layout(hello_repo, tmp_path):
    """A repository copy, plus a valid model folder outside it and symlinks pointing out."""
    repo = copy_repo(hello_repo, str(tmp_path / "repo"))
    outside = tmp_path / "outside"
    shutil.copytree(os.path.join(repo, "rnn"), outside / "stolen")
    os.symlink(outside / "stolen", os.path.join(repo, "escape"))                 # a model folder out
    return repo, str(outside)


TRAVERSALS = ["{outside}/stolen", "/etc", "/proc", "../outside/stolen", "..", ".", "", "rnn/../emb-lstm",
              "rnn/1", "emb-lstm/", "./rnn", ".hidden", "a\\b", "nul\0byte", "x" * 300, "escape"]


def test_every_traversal_attempt_is_invalid_argument(layout):
    repo, outside = layout
    with serving(repo, model_control_mode="explicit", warmup=False) as (_, address), \
            grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        names = {m.name for m in before.models}
        assert "escape" not in names and {"rnn", "emb-rnn", "emb-gru"} <= names   # the scan skipped it
        for attempt in TRAVERSALS:
            name = attempt.format(outside=outside)
            code, message = _status(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name))
            assert code == INVALID, (name, code, message)
            assert len(message) < 400, message
            code, _ = _status(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name))
            assert code in (INVALID, grpc.StatusCode.NOT_FOUND), (name, code)
        assert stub.RepositoryIndex(pb.RepositoryIndexRequest()) == before     # nothing new was loaded
        # A name that is one folder of the repository still loads.
        assert _status(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="rnn"))[0] == \
            grpc.StatusCode.OK


def test_model_control_is_off_by_default(hello_repo):
    with serving(hello_repo, warmup=False) as (server, address), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in ((stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="rnn")),
                              (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="rnn"))):
            code, message = _status(call, request)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "--model-control-mode none" in message
        assert server.dataplane.model_ready("rnn") and server.dataplane.admin.poller is None


def test_odd_version_folders_are_skipped_not_fatal(hello_repo, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    repo = copy_repo(hello_repo, str(tmp_path / "repo"))
    for folder in ("²", "٣", "0", "007", "-1", "v2"):
        os.makedirs(os.path.join(repo, "rnn", folder))
    assert not any(is_version(f) for f in ("²", "٣", "0", "007", "-1", "v2", "")) and is_version("12")
    dp = make_dataplane(repo, warmup=False, model_control_mode="poll", poll_interval=60)
    try:
        assert [e.version for e in dp.admin.repository_index() if e.name == "rnn"] == ["1"]
        assert dp.predict_text("rnn", "hello").decoded == "ohlol"
        shutil.copytree(os.path.join(repo, "rnn", "1"), os.path.join(repo, "rnn", "3"))
        assert dp.repo.poll() == ["rnn"]                                 # the pass goes on past '²'
        assert [e.version for e in dp.admin.repository_index() if e.name == "rnn"] == ["1", "3"]
    finally:
        dp.close()
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert any("²" in m for m in skipped) and len(skipped) == len(set(skipped))   # once each


def test_settings_out_of_range_stop_create_server_before_loading(hello_repo):
    for bad in (dict(max_seq_len=0), dict(max_batch_size=0), dict(instances=-1), dict(max_queue_size=0),
                dict(model_control_mode="sometimes"), dict(poll_interval=5.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_server(ServeSettings(repository=hello_repo, port=0, **bad))


def test_create_server_port_zero_start_wait_and_stop(hello_repo):
    """The gRPC examples' shape from plain code: create_server(...) -> (server, port) on port 0,
    start(), wait_for_termination() (True while serving, as grpc's on a timeout), stop(grace)."""
    server, port = create_server(ServeSettings(repository=hello_repo, port=0, host="127.0.0.1"))
    assert port > 0
    server.start()
    try:
        assert server.wait_for_termination(0.05) is True
    finally:
        server.stop(0.5)
    assert server.wait_for_termination(0.05) is False
