"""`rnnserve-server --model DIR/model.onnx` serves one exported file as a one-model repository; the
bound addresses are logged at WARNING; a server with no READY model says so at ERROR, and --strict
exits 1 instead of listening."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from rnnserve.serve.__main__ import parse_settings
from rnnserve.serve.client import RnnClient
from tests.fixtures import ROOT


@pytest.fixture
def single_export(hello_repo, tmp_path) -> str:
    """What `rnnserve-export CKPT --out DIR` leaves: DIR/model.onnx, no version folder."""
    out = tmp_path / "export" / "emb-gru"
    out.mkdir(parents=True)
    shutil.copy(f"{hello_repo}/emb-gru/1/model.onnx", out / "model.onnx")
    return str(out)


def _server(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rnnserve.serve", "--port", "0", "--threads", "1",
                             "--no-warmup", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_one_exported_file_is_served_and_the_addresses_are_logged(single_export, tmp_path):
    port_file = tmp_path / "port"
    proc = _server("--model", f"{single_export}/model.onnx", "--metrics-port", "0", "--port-file", str(port_file))
    try:
        line = proc.stdout.readline()
        assert line.startswith("rnnserve listening on 127.0.0.1:"), proc.stderr.read() if proc.poll() else line
        port, metrics_port = int(port_file.read_text()), int((tmp_path / "port.metrics").read_text())
        with RnnClient(f"127.0.0.1:{port}") as client:
            assert [m["name"] for m in client.models()] == ["emb-gru"]   # the folder's name
            assert client.predict("emb-gru", "hello")["decoded"] == "ohlol"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
        line = [x for x in err.splitlines() if " listening on " in x]
        assert len(line) == 1 and " WARNING " in line[0], err
        assert line[0].endswith(f"listening on 127.0.0.1:{port} (gRPC), Prometheus metrics on "
                                f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_no_ready_model_is_an_error_and_strict_exits(single_export):
    proc = _server("--repository", single_export, "--strict")   # an export folder is not a repository
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "listening" not in out
    line = [x for x in err.splitlines() if "no model is READY" in x]
    assert len(line) == 1 and " ERROR " in line[0] and "--model DIR/model.onnx" in line[0], err


def test_model_and_repository_flags(single_export):
    with pytest.raises(SystemExit):
        parse_settings(["--model", single_export, "--repository", "r"], env={})
    with pytest.raises(SystemExit):
        parse_settings([], env={})
    settings, args = parse_settings(["--model", single_export, "--model-name", "x"], env={})
    assert args.model == single_export and args.model_name == "x" and settings.repository == ""
