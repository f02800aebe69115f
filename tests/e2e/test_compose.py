"""The docker-compose deployment, without a Docker engine.

1. `docker-compose config -q` validates the file, alone and with the TLS/token override
   docker-compose.secure.yml (skipped, with the reason, where the tool is absent; .ci/run
   installs Debian's docker-compose). Every port is published on loopback only.
2. The commands the `train`, `export` and `server` services run are run here as
   plain processes, with the compose file's own environment, the named volumes
   mapped to temp folders and the server bound to loopback. The server must
   answer health (with the service's own healthcheck command), predictions and
   Prometheus metrics (the port the server writes to <port-file>.metrics). Then the server
   again with docker-compose.secure.yml's environment and secrets made by
   deploy/make-secrets.sh: the secure healthcheck command, TLS and a token.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import ROOT

COMPOSE = ROOT / "docker-compose.yml"
SECURE = ROOT / "docker-compose.secure.yml"


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def test_compose_config_is_valid():
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    for files in ([COMPOSE], [COMPOSE, SECURE]):
        res = subprocess.run([tool, *[a for f in files for a in ("-f", str(f))], "config", "-q"],
                             capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr


def test_ports_are_published_on_loopback_and_tls_reaches_the_servers():
    for name, service in load_compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    secure = load_compose(SECURE)
    mounted = set(secure["services"]["lb"]["secrets"])
    envoy = yaml.safe_load((ROOT / "deploy/envoy-tls.yaml").read_text())
    cluster = envoy["static_resources"]["clusters"][0]
    upstream = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert upstream["validation_context"]["trusted_ca"]["filename"] == "/run/secrets/ca.crt"
    listener = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    files = listener["typed_config"]["common_tls_context"]["tls_certificates"][0]
    used = {upstream["validation_context"]["trusted_ca"]["filename"], files["certificate_chain"]["filename"],
            files["private_key"]["filename"]}
    assert {f"/run/secrets/{name}" for name in mounted} >= used
    for name, service in secure["services"].items():
        for secret in service.get("secrets", []):
            assert secret in secure["secrets"], (name, secret)


def test_compose_declares_the_deployment():
    services = load_compose()["services"]
    assert {"server", "server-gpu", "train", "export", "prometheus", "lb"} <= set(services)
    assert services["server-gpu"]["profiles"] == ["gpu"]
    assert services["server-gpu"]["environment"]["RNNSERVE_DEVICE"] == "cuda"
    gpu = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["train"]["profiles"] == services["export"]["profiles"] == ["tools"]
    assert "models:/models:ro" in services["server"]["volumes"]
    # sequences shared by the replicas: the servers use the redis service when RNNSERVE_STATE_STORE says so
    assert "redis" in services and "6379" in services["redis"]["expose"]
    assert services["server"]["environment"]["RNNSERVE_STATE_STORE"] == "${RNNSERVE_STATE_STORE:-memory}"
    assert _interpolate("${RNNSERVE_STATE_STORE:-memory}", {}) == "memory"
    assert _interpolate("${RNNSERVE_STATE_STORE:-memory}", {"RNNSERVE_STATE_STORE": "redis://redis:6379/0"}) \
        == "redis://redis:6379/0"
    envoy = yaml.safe_load((ROOT / "deploy/envoy.yaml").read_text())
    assert envoy["static_resources"]["clusters"][0]["lb_policy"] == "RING_HASH"
    assert "sequence-id" in (ROOT / "deploy/envoy.yaml").read_text()
    for name in ("deploy/prometheus.yml", "deploy/envoy.yaml", "docker/server.Dockerfile",
                 "docker/server-gpu.Dockerfile", "docker/tools.Dockerfile"):
        assert (ROOT / name).is_file(), name
    # The server image must not carry torch.
    server_image = (ROOT / "docker/server.Dockerfile").read_text()
    assert "torch" not in server_image.replace("no torch", "")
    assert "[cpu]" in server_image and "train" not in server_image.split("pip install")[1]


def _volume_map(service: dict, tmp: Path) -> dict:
    """container path -> host temp folder, for the service's named volumes."""
    out = {}
    for spec in service.get("volumes", []):
        name, target = spec.split(":")[:2]
        out[target] = str(tmp / name)
        (tmp / name).mkdir(exist_ok=True)
    return out


def _localize(value: str, volumes: dict) -> str:
    for target, host in volumes.items():
        if value == target or value.startswith(target + "/"):
            return host + value[len(target):]
    return value


def _script(name: str) -> str:
    """A console script of this installation (the images install the same ones)."""
    assert name.startswith("rnnserve-"), f"compose commands run our console scripts, not {name!r}"
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.access(path, os.X_OK), f"{name} is not installed beside {sys.executable}"
    return path


def _interpolate(value: str, env: dict) -> str:
    """Compose's ${VAR:-default}: the variable when set and non-empty, else the default."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], value)


def _process(service: dict, tmp: Path, overrides: dict | None = None, secrets: dict | None = None):
    """(argv, env) that run a compose service's command as a local process; `secrets`: name ->
    host file, for /run/secrets/<name>."""
    volumes = _volume_map(service, tmp)
    volumes.update({f"/run/secrets/{name}": path for name, path in (secrets or {}).items()})
    command = service["command"]
    argv = [_script(command[0])] + [_localize(a, volumes) for a in command[1:]]
    env = dict(os.environ)
    for key, value in (service.get("environment") or {}).items():
        env[key] = _localize(_interpolate(str(value), env), volumes)
    env.update(overrides or {})
    return argv, env


def test_compose_commands_run_as_plain_processes(tmp_path):
    services = load_compose()["services"]
    for job in ("train", "export"):
        argv, env = _process(services[job], tmp_path)
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert res.returncode == 0, f"{job}: {res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")) == \
        sorted(["rnncell", "rnn", "emb-rnn", "emb-lstm", "emb-gru"])

    server = services["server"]
    assert int(server["environment"]["RNNSERVE_METRICS_PORT"]) > 0
    with _serve(server, tmp_path, "plain") as (address, metrics_port):
        # The service's own healthcheck command, pointed at this server.
        check = [a.replace("127.0.0.1:8001", address) for a in server["healthcheck"]["test"][1:]]
        res = subprocess.run([_script(check[0])] + check[1:], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        res = subprocess.run([sys.executable, "-m", "rnnserve.serve.client", "--address", address, "--json",
                              "predict", "emb-lstm", "hello"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "ohlol" in res.stdout, res.stdout + res.stderr
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        families = list(text_string_to_metric_families(body))
        samples = [s for f in families for s in f.samples]

        def value(name, **labels):
            return sum(s.value for s in samples
                       if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
        assert value("rnnserve_requests_total", model="emb-lstm", method="Predict", code="OK") == 1
        assert value("rnnserve_requests_total") == 1                            # the predict above
        assert value("rnnserve_model_state", model="emb-lstm", version="1", state="READY") == 1
        assert value("rnnserve_executions_total", model="emb-lstm") >= 1
        assert {"rnnserve_requests", "rnnserve_inferences", "rnnserve_executions", "rnnserve_batch_size",
                "rnnserve_queue_duration_seconds", "rnnserve_compute_duration_seconds",
                "rnnserve_request_duration_seconds", "rnnserve_live_sequences",
                "rnnserve_model_state"} <= {f.name for f in families}

    # docker-compose.secure.yml: the same service with TLS and tokens from mounted secrets.
    secrets_dir = tmp_path / "secrets"
    res = subprocess.run(["bash", str(ROOT / "deploy/make-secrets.sh"), str(secrets_dir)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    secure = load_compose(SECURE)["services"]["server"]
    merged = dict(server, environment={**server["environment"], **secure["environment"]})
    mounted = {name: str(secrets_dir / name) for name in secure["secrets"]}
    tokens = dict(line.split() for line in (secrets_dir / "tokens").read_text().splitlines()
                  if line and not line.startswith("#"))
    with _serve(merged, tmp_path, "secure", mounted) as (address, metrics_port):
        port = address.rsplit(":", 1)[1]
        check = [a.replace("localhost:8001", f"localhost:{port}") for a in secure["healthcheck"]["test"][1:]]
        check = [a.replace("/run/secrets/", f"{secrets_dir}/") for a in check]
        res = subprocess.run([_script(check[0])] + check[1:], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        client = [sys.executable, "-m", "rnnserve.serve.client", "--address", address, "--tls-ca",
                  str(secrets_dir / "ca.crt"), "predict", "emb-lstm", "hello"]
        res = subprocess.run(client, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and "UNAUTHENTICATED" in res.stderr, res.stdout + res.stderr
        res = subprocess.run(client + ["--token", tokens["infer"]], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "ohlol" in res.stdout, res.stdout + res.stderr
        context = ssl.create_default_context(cafile=str(secrets_dir / "ca.crt"))
        body = urllib.request.urlopen(f"https://localhost:{metrics_port}/metrics", timeout=10,
                                      context=context).read().decode()
        assert "rnnserve_requests_total" in body


@contextlib.contextmanager
def _serve(service: dict, tmp_path: Path, name: str, secrets: dict | None = None):
    """The service's command as a process on 127.0.0.1 (free ports); yields (address, metrics port)."""
    port_file = tmp_path / f"{name}.port"
    argv, env = _process(service, tmp_path, {
        "RNNSERVE_HOST": "127.0.0.1", "RNNSERVE_PORT": "0", "RNNSERVE_PORT_FILE": str(port_file),
        "RNNSERVE_METRICS_PORT": "0",
    }, secrets)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        metrics_file = Path(str(port_file) + ".metrics")   # written before the gRPC port file
        assert metrics_file.is_file(), "the server did not write <port-file>.metrics"
        yield f"127.0.0.1:{int(port_file.read_text())}", int(metrics_file.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
