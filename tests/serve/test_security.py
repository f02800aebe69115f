"""TLS, mTLS and bearer tokens over the wire: certificates made here (tests/certs.py), a real
server on 127.0.0.1:0, our client and tritonclient. Certificate files replaced while serving
are picked up by the next connection; open connections and the server go on."""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import ssl
import urllib.error
import urllib.request

import grpc
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rnnserve.serve import client as client_cli
from rnnserve.serve.client import RnnClient
from rnnserve.serve.frontend import auth
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.certs import CA
from tests.fixtures import serving

FAST = dict(warmup=False)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _scrape(port: int, context: ssl.SSLContext) -> str:
    return urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=context, timeout=10).read().decode()


def _client_context(ca: str, pair=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    return context


def _replace(src: str, dst: str) -> None:
    shutil.copyfile(src, dst + ".new")
    os.replace(dst + ".new", dst)   # a new inode, as a deployment tool swaps files


def test_tls_handshake_metrics_and_reload_without_dropping(hello_repo, tmp_path):
    ca = CA(tmp_path / "ca1", "first CA")
    server_pair = ca.issue("server", server=True)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = str(live / "server.crt"), str(live / "server.key")
    shutil.copyfile(server_pair.cert, cert)
    shutil.copyfile(server_pair.key, key)
    with serving(hello_repo, tls_cert=cert, tls_key=key, metrics_port=0, **FAST) as (server, address):
        with RnnClient(address, tls_ca=ca.pair.cert, timeout=10) as secure:
            assert secure.predict("emb-lstm", "hello")["decoded"] == "ohlol"
            with RnnClient(address, timeout=5) as plain:              # plaintext to a TLS port
                assert _code(lambda: plain.predict("emb-lstm", "hello")) == grpc.StatusCode.UNAVAILABLE
            other = CA(tmp_path / "ca2", "second CA")
            with RnnClient(address, tls_ca=other.pair.cert, timeout=5) as wrong_ca:
                assert _code(lambda: wrong_ca.predict("emb-lstm", "hello")) == grpc.StatusCode.UNAVAILABLE
            assert "rnnserve_requests_total" in _scrape(server.metrics_port, _client_context(ca.pair.cert))
            with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
                urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)

            # New files on disk: the next connection gets the new certificate; the open one goes on.
            renewed = other.issue("server2", server=True)
            _replace(renewed.key, key)
            _replace(renewed.cert, cert)
            with pytest.raises((urllib.error.URLError, ssl.SSLError)):   # this handshake notices the change
                _scrape(server.metrics_port, _client_context(other.pair.cert))
            assert "rnnserve_requests_total" in _scrape(server.metrics_port, _client_context(other.pair.cert))
            with RnnClient(address, tls_ca=other.pair.cert, timeout=10) as fresh:
                assert fresh.predict("emb-gru", "hello")["decoded"] == "ohlol"
            with RnnClient(address, tls_ca=ca.pair.cert, timeout=5) as stale:
                assert _code(lambda: stale.predict("emb-lstm", "hello")) == grpc.StatusCode.UNAVAILABLE
            assert secure.predict("emb-lstm", "hello")["decoded"] == "ohlol"    # not dropped
            assert "rnnserve_requests_total" in _scrape(server.metrics_port, _client_context(other.pair.cert))

            # A broken file is refused and the current certificate stays; SIGHUP's reload re-reads.
            (live / "server.key").write_text("not a key")
            server.reload_certificates()
            with RnnClient(address, tls_ca=other.pair.cert, timeout=10) as again:
                assert again.predict("emb-lstm", "hello")["decoded"] == "ohlol"


def test_mtls_refuses_clients_without_a_certificate(hello_repo, tmp_path):
    ca = CA(tmp_path / "ca")
    server_pair, client_pair = ca.issue("server", server=True), ca.issue("client", server=False)
    stranger = CA(tmp_path / "other", "other CA").issue("stranger", server=False)
    with serving(hello_repo, tls_cert=server_pair.cert, tls_key=server_pair.key, tls_client_ca=ca.pair.cert,
                 tls_require_client_cert=True, metrics_port=0, **FAST) as (server, address):
        with RnnClient(address, tls_ca=ca.pair.cert, tls_cert=client_pair.cert, tls_key=client_pair.key,
                       timeout=10) as client:
            assert client.predict("emb-lstm", "hello")["decoded"] == "ohlol"
        with RnnClient(address, tls_ca=ca.pair.cert, timeout=5) as anonymous:
            assert _code(lambda: anonymous.predict("emb-lstm", "hello")) == grpc.StatusCode.UNAVAILABLE
        with RnnClient(address, tls_ca=ca.pair.cert, tls_cert=stranger.cert, tls_key=stranger.key,
                       timeout=5) as foreign:
            assert _code(lambda: foreign.predict("emb-lstm", "hello")) == grpc.StatusCode.UNAVAILABLE
        assert "rnnserve_requests_total" in _scrape(server.metrics_port, _client_context(ca.pair.cert, client_pair))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _scrape(server.metrics_port, _client_context(ca.pair.cert))


def test_bad_tls_files_stop_the_start(hello_repo, tmp_path):
    ca = CA(tmp_path / "ca")
    one, two = ca.issue("one", server=True), ca.issue("two", server=True)
    with pytest.raises(ValueError, match="do not load"):
        with serving(hello_repo, tls_cert=one.cert, tls_key=two.key, **FAST):   # key of another cert
            pass
    with pytest.raises(ValueError, match="cannot read"):
        with serving(hello_repo, tls_cert=str(tmp_path / "missing.crt"), tls_key=one.key, **FAST):
            pass


@pytest.fixture(scope="module")
def token_server(hello_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    token_file = folder / "tokens"
    token_file.write_text("# role token\ninfer tok-infer\nadmin tok-admin\n")
    with serving(hello_repo, token_file=str(token_file), tokens="infer:tok-env",
                 model_control_mode="explicit", **FAST) as (server, address):
        yield server, address


def _bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def test_tokens_and_roles_over_the_wire(token_server, caplog):
    caplog.set_level(logging.DEBUG)
    _, address = token_server
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ready = pb.ServerReadyRequest()
        assert _code(lambda: stub.ServerReady(ready)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: stub.ServerReady(ready, metadata=_bearer("tok-wrong"))) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: stub.ServerReady(ready, metadata=(("authorization", "Basic tok-infer"),))) == \
            grpc.StatusCode.UNAUTHENTICATED
        for token in ("tok-infer", "tok-env", "tok-admin"):
            assert stub.ServerReady(ready, metadata=_bearer(token)).ready
        assert stub.ServerReady(ready, metadata=(("authorization", "bearer tok-infer"),)).ready
        admin_calls = [
            lambda md: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=md),
            lambda md: stub.ModelStatistics(pb.ModelStatisticsRequest(name="emb-lstm"), metadata=md),
            lambda md: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="rnn"), metadata=md),
            lambda md: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="rnn"), metadata=md),
        ]
        # streaming calls are refused before their handler runs, as unary ones are
        stream = pb.ModelInferRequest(model_name="emb-lstm")
        assert _code(lambda: list(stub.ModelStreamInfer(iter([stream])))) == grpc.StatusCode.UNAUTHENTICATED
        text = tpb_grpc.TextServiceStub(channel)
        assert _code(lambda: list(text.Generate(tpb.GenerateRequest(model="emb-lstm", prompt="hel", max_tokens=2)))) \
            == grpc.StatusCode.UNAUTHENTICATED
        for call in admin_calls:
            assert _code(lambda call=call: call(_bearer("tok-infer"))) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda call=call: call(None)) == grpc.StatusCode.UNAUTHENTICATED
            call(_bearer("tok-admin"))
        # health stays open for probes; reflection is off when tokens are on
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with RnnClient(address, token="tok-infer", timeout=10) as client:
        assert client.predict("emb-lstm", "hello")["decoded"] == "ohlol"
        assert "".join(e["text"] for e in client.generate("emb-lstm", "hel", 2, temperature=0)) == "lo"
    with tc.InferenceServerClient(address) as triton:
        assert triton.is_server_ready(headers={"authorization": "Bearer tok-infer"})
        assert triton.get_model_repository_index(headers={"authorization": "Bearer tok-admin"}).models
    assert not any(t in record.getMessage() for record in caplog.records
                   for t in ("tok-infer", "tok-admin", "tok-env", "tok-wrong"))


def test_client_cli_sends_the_token(token_server, tmp_path, monkeypatch, capsys):
    _, address = token_server
    assert client_cli.main(["--address", address, "predict", "emb-lstm", "hello"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("RNNSERVE_CLIENT_TOKEN", "tok-infer")
    assert client_cli.main(["--address", address, "--json", "predict", "emb-lstm", "hello"]) == 0
    assert "ohlol" in capsys.readouterr().out
    monkeypatch.delenv("RNNSERVE_CLIENT_TOKEN")
    (tmp_path / "token").write_text("tok-admin\n")
    assert client_cli.main(["--address", address, "models", "--token-file", str(tmp_path / "token")]) == 0
    assert "emb-lstm" in capsys.readouterr().out


def test_health_can_need_a_token_and_reflection_can_stay_on(hello_repo):
    with serving(hello_repo, tokens="infer:tok", health_needs_token=True, reflection=True, **FAST) as (_, address), \
            grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        assert _code(lambda: health.Check(request)) == grpc.StatusCode.UNAUTHENTICATED
        assert health.Check(request, metadata=_bearer("tok")).status == health_pb2.HealthCheckResponse.SERVING
        with RnnClient(address, token="tok", timeout=10) as client:
            assert client.health() == "SERVING"


def test_the_decision_is_a_plain_function(caplog):
    policy = auth.Policy(tokens=auth.parse_tokens("admin a-token", "infer:i-token"))
    service = "/inference.GRPCInferenceService/"
    infer_call, admin_call = service + "ModelInfer", service + "RepositoryIndex"
    assert auth.decide(auth.Policy(), admin_call, ()) is None                       # no tokens: open
    assert auth.decide(policy, infer_call, [("authorization", "Bearer i-token")]) is None
    assert auth.decide(policy, admin_call, [("authorization", "Bearer a-token")]) is None
    assert auth.decide(policy, infer_call, [("authorization", "Bearer a-token")]) is None   # admin may infer
    assert auth.decide(policy, admin_call, [("authorization", "Bearer i-token")]).code == "PERMISSION_DENIED"
    assert auth.decide(policy, infer_call, []).code == "UNAUTHENTICATED"
    assert auth.decide(policy, "/grpc.health.v1.Health/Check", []) is None
    for text, env in (("root x", ""), ("", "infer"), ("", "infer:"), ("infer two words", "")):
        with pytest.raises(ValueError) as info:
            auth.parse_tokens(text, env)
        assert "words" not in str(info.value) and "x" not in str(info.value).split(":")[0][-2:]
    caplog.set_level(logging.WARNING)
    auth.warn_if_open(auth.Policy(), "0.0.0.0")
    auth.warn_if_open(auth.Policy(), "127.0.0.1")
    auth.warn_if_open(policy, "0.0.0.0")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "0.0.0.0" in caplog.records[0].getMessage()
