"""`rnnserve-server` as a real process: flags and RNNSERVE_* variables, the
listening line and --port-file, and the graceful drain on SIGTERM / SIGINT (an
in-flight streaming call completes, new calls are refused, the exit status is 0)."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from rnnserve.serve.__main__ import ENV_ONLY, parse_settings
from rnnserve.serve.client import RnnClient
from rnnserve.serve.settings import ServeSettings
from tests.fixtures import ROOT

LONG_GENERATE = 20_000   # tokens: a few seconds of streaming, so the call is surely in flight


def test_flag_beats_env_beats_default():
    settings, args = parse_settings(["--port", "0", "--threads", "3", "--no-warmup"],
                                    env={"RNNSERVE_REPOSITORY": "/models", "RNNSERVE_PORT": "9",
                                         "RNNSERVE_GRACE": "2.5", "RNNSERVE_DEVICE": "cpu",
                                         "RNNSERVE_WARMUP": "true"})
    assert settings.repository == "/models"          # env
    assert settings.port == 0                        # flag over env
    assert settings.grace == 2.5 and settings.device == "cpu"
    assert settings.intra_op_threads == 3 and settings.warmup is False
    assert settings.max_seq_len == 65536              # default
    settings, _ = parse_settings(["--repository", "/flag"], env={"RNNSERVE_REPOSITORY": "/env"})
    assert settings.repository == "/flag"


def test_every_setting_has_a_flag_and_bad_values_fail():
    with pytest.raises(SystemExit):
        parse_settings([], env={})                    # --repository is required
    with pytest.raises(SystemExit):
        parse_settings(["--repository", "r", "--device", "tpu"], env={})
    with pytest.raises(SystemExit):
        parse_settings(["--repository", "r"], env={"RNNSERVE_PORT": "eighty"})
    help_text = subprocess.run([sys.executable, "-m", "rnnserve.serve", "--help"], capture_output=True,
                               text=True, cwd=ROOT, timeout=60).stdout
    for field in dataclasses.fields(ServeSettings):
        assert ("--" + field.name.replace("_", "-") in help_text) == (field.name not in ENV_ONLY)
        assert "RNNSERVE_" + field.name.upper() in help_text


def _start_server(repo: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp_path / "port"
    env = dict(os.environ, RNNSERVE_REPOSITORY=repo, RNNSERVE_PORT="1",   # the flag wins
               RNNSERVE_MAX_GENERATE_TOKENS=str(LONG_GENERATE))
    proc = subprocess.Popen([sys.executable, "-m", "rnnserve.serve", "--port", "0", "--grace", "30",
                             "--threads", "1", "--port-file", str(port_file)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()   # blocks until the server is ready (or exits)
    assert line.startswith("rnnserve listening on 127.0.0.1:"), (line, proc.stderr.read()
                                                                  if proc.poll() is not None else "")
    port = int(port_file.read_text())
    assert line.strip().endswith(f":{port}")
    return proc, f"127.0.0.1:{port}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_calls(hello_repo, tmp_path, signum):
    proc, address = _start_server(hello_repo, tmp_path)
    try:
        with RnnClient(address) as client:
            assert client.health() == "SERVING"
            stream = client.generate("emb-lstm", "h", max_tokens=LONG_GENERATE, seed=5)
            events = [next(stream)]              # the call is now in flight
            proc.send_signal(signum)
            with RnnClient(address, timeout=5) as late:   # new calls during the drain
                t0 = time.monotonic()
                while late.ready() and time.monotonic() - t0 < 10:
                    time.sleep(0.02)
                assert not late.ready() and late.live()    # draining: live, not ready
                with pytest.raises(grpc.RpcError) as refused:
                    late.predict("emb-lstm", "hello")
                # UNAVAILABLE, which clients and load balancers retry on another replica
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in refused.value.details()
                assert late.metadata("emb-lstm")["name"] == "emb-lstm"   # metadata still answers
            events.extend(stream)                # ... and the in-flight call still completes
        assert len(events) == LONG_GENERATE
        assert [e["index"] for e in events[-2:]] == [LONG_GENERATE - 2, LONG_GENERATE - 1]
        assert events[-1]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        stderr = proc.stderr.read()
        assert "draining" in stderr and "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
