"""Shared session-scoped fixtures: real trained/exported models in Triton-style repositories.

- hello_repo: str path of REPO/<preset>/1/model.onnx for the five hello presets
  (rnncell, rnn, emb-rnn, emb-lstm, emb-gru), trained here with train_hello.
- hello_built: the same build with .checkpoints ("<preset>/1" -> checkpoint.pt) and
  .predicted (preset -> the PyTorch model's answer for "hello").
- charlm_repo / charlm_built: random-weight char models over tests.fixtures.CHARLM_VOCAB:
  "charlm" (2-layer LSTM, versions 1 and 2), "chargru" (1-layer one-hot GRU),
  "bigru" (bidirectional 2-layer GRU, no state inputs).
- hello_dataplane / charlm_dataplane: loaded DataPlanes over those repositories.
- chunk_planes: (chunked, whole) DataPlanes over charlm_repo, one splitting runs above
  tests.fixtures.CHUNK_BUDGET into time chunks, one never (one per test module).
- hello_server: (server, "127.0.0.1:port") serving hello_repo with the test settings
  (tests.fixtures.serving); one per test module.
- redis_server: a real redis-server on a free loopback port (tests/cluster.py), without
  persistence; a test that stops it must start it again (`.proc is None` while stopped).
Treat the repositories as read-only; copy one (tests.fixtures.copy_repo) to change it.
"""
from __future__ import annotations

import pytest

from tests.cluster import RedisServer, redis_server_path
from tests.fixtures import (
    CHUNK_BUDGET,
    CHUNK_STEPS,
    BuiltRepo,
    build_charlm_repo,
    build_hello_repo,
    make_dataplane,
    serving,
)


@pytest.fixture(scope="session")
def hello_built(tmp_path_factory) -> BuiltRepo:
    return build_hello_repo(str(tmp_path_factory.mktemp("hello")))


@pytest.fixture(scope="session")
def hello_repo(hello_built) -> str:
    return hello_built.path


@pytest.fixture(scope="session")
def charlm_built(tmp_path_factory) -> BuiltRepo:
    return build_charlm_repo(str(tmp_path_factory.mktemp("charlm")))


@pytest.fixture(scope="session")
def charlm_repo(charlm_built) -> str:
    return charlm_built.path


@pytest.fixture(scope="session")
def hello_dataplane(hello_repo):
    """A loaded DataPlane (CPU, 1 thread) over hello_repo. Do not unload its models."""
    dp = make_dataplane(hello_repo)
    yield dp
    dp.close()


@pytest.fixture(scope="module")
def chunk_planes(charlm_repo):
    chunked = make_dataplane(charlm_repo, max_seq_len=CHUNK_STEPS, max_run_bytes=CHUNK_BUDGET, warmup=False)
    whole = make_dataplane(charlm_repo, max_seq_len=CHUNK_STEPS, max_run_bytes=0, warmup=False)
    yield chunked, whole
    chunked.close()
    whole.close()


@pytest.fixture(scope="session")
def charlm_dataplane(charlm_repo):
    """A loaded DataPlane (CPU, 1 thread, max_seq_len 64, max_generate_tokens 50) over charlm_repo."""
    dp = make_dataplane(charlm_repo, max_seq_len=64, max_generate_tokens=50)
    yield dp
    dp.close()


@pytest.fixture(scope="module")
def hello_server(hello_repo):
    with serving(hello_repo) as (server, address):
        yield server, address


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
