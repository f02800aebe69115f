"""`rnnserve-server` refuses bad flags and RNNSERVE_* values as real processes: one clear line on
stderr, exit 2, no traceback, no server that starts and then refuses everything. Environment
values are checked exactly as their flags (any case for choices, e.g. RNNSERVE_LOG_LEVEL=warning)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rnnserve.serve.client import RnnClient
from rnnserve.serve.grpc_core import SERVER_EXPERIMENTS
from tests.fixtures import ROOT

pytestmark = pytest.mark.e2e

BAD = [  # (flags, environment, words the one line must contain)
    (["--max-seq-len", "0"], {}, "--max-seq-len"),
    (["--max-batch-size", "0"], {}, "--max-batch-size"),
    (["--instances", "-1"], {}, "--instances"),
    (["--lone-threads", "-2"], {}, "--lone-threads"),
    (["--wide-threads", "-1"], {}, "--wide-threads"),
    (["--inline-run-us", "-1"], {}, "--inline-run-us"),
    ([], {"RNNSERVE_EVENT_LOOP": "trio"}, "RNNSERVE_EVENT_LOOP"),
    ([], {"RNNSERVE_LONE_THREADS": "many"}, "RNNSERVE_LONE_THREADS"),
    (["--max-queue-size", "0"], {}, "--max-queue-size"),
    (["--grpc-workers", "0"], {}, "--grpc-workers"),
    (["--max-sequences", "-3"], {}, "--max-sequences"),
    (["--max-message-bytes", "0"], {}, "--max-message-bytes"),
    (["--max-response-bytes", "0"], {}, "--max-response-bytes"),
    (["--max-response-bytes", str(2**31)], {}, "--max-response-bytes"),
    (["--max-run-bytes", "-1"], {}, "--max-run-bytes"),
    ([], {"RNNSERVE_MAX_RESPONSE_BYTES": "64MiB"}, "RNNSERVE_MAX_RESPONSE_BYTES"),
    ([], {"RNNSERVE_MAX_RESPONSE_BYTES": "-5"}, "RNNSERVE_MAX_RESPONSE_BYTES"),
    ([], {"RNNSERVE_MAX_SEQ_LEN": "0"}, "RNNSERVE_MAX_SEQ_LEN"),
    ([], {"RNNSERVE_INSTANCES": "two"}, "RNNSERVE_INSTANCES"),
    ([], {"RNNSERVE_LOG_LEVEL": "loud"}, "RNNSERVE_LOG_LEVEL"),
    ([], {"RNNSERVE_DEVICE": "tpu"}, "RNNSERVE_DEVICE"),
    ([], {"RNNSERVE_WARMUP": "maybe"}, "RNNSERVE_WARMUP"),
    ([], {"RNNSERVE_MODEL_CONTROL_MODE": "sometimes"}, "RNNSERVE_MODEL_CONTROL_MODE"),
    (["--poll-interval", "5"], {}, "--poll-interval"),
    (["--tls-cert", "server.crt"], {}, "--tls-key"),
    (["--tls-require-client-cert", "--tls-cert", "c", "--tls-key", "k"], {}, "--tls-require-client-cert"),
]


def _run(flags, env_extra, repo):
    env = dict(os.environ, RNNSERVE_REPOSITORY=repo, **env_extra)
    return subprocess.run([sys.executable, "-m", "rnnserve.serve", "--port", "0", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_bad_values_exit_2_with_one_line(hello_repo):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: _run(case[0], case[1], hello_repo), BAD))
    for (flags, env, word), res in zip(BAD, results):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (flags, env, res.stderr[-500:])
        assert "Traceback" not in res.stderr and "listening" not in res.stdout
        assert len(lines) == 1 and word in lines[0] and lines[0].startswith("rnnserve-server: error:"), lines


def test_a_bad_token_file_exits_2(hello_repo, tmp_path):
    (tmp_path / "tokens").write_text("superuser s3cret\n")
    res = _run(["--token-file", str(tmp_path / "tokens"), "--no-warmup"], {}, hello_repo)
    assert res.returncode == 2 and "unknown role" in res.stderr and "s3cret" not in res.stderr
    assert "Traceback" not in res.stderr


def test_environment_values_in_any_case_start_a_server(hello_repo, tmp_path):
    port_file = tmp_path / "port"
    env = dict(os.environ, RNNSERVE_REPOSITORY=hello_repo, RNNSERVE_LOG_LEVEL="warning", RNNSERVE_DEVICE="CPU",
               RNNSERVE_MODEL_CONTROL_MODE="Explicit", RNNSERVE_WARMUP="no", RNNSERVE_EVENT_LOOP="AsyncIO")
    proc = subprocess.Popen([sys.executable, "-m", "rnnserve.serve", "--port", "0", "--port-file", str(port_file),
                             "--threads", "1", "--log-level", "Info"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with RnnClient(f"127.0.0.1:{int(port_file.read_text())}", timeout=30) as client:
            assert client.predict("emb-lstm", "hello")["decoded"] == "ohlol"
            proc.send_signal(signal.SIGHUP)          # re-reads TLS files (none here); never stops it
            time.sleep(0.5)
            assert proc.poll() is None and client.predict("emb-lstm", "hello")["decoded"] == "ohlol"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and " INFO " in err      # the flag (any case) beat the environment
    assert "event loop: asyncio" in err                  # RNNSERVE_EVENT_LOOP, any case (default: uvloop)
    # gRPC core settings made before grpc loaded (serve/grpc_core.py), and grpc knew them
    assert f"GRPC_EXPERIMENTS={SERVER_EXPERIMENTS!r}" in err and "nknown experiment" not in err, err[-2000:]
