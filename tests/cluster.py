"""Real parts for the state-store tests: a redis-server on a free loopback port and
`rnnserve-server` replicas as subprocesses (port 0, --port-file), all sharing it.

redis-server runs without persistence (--save "", no append-only file) in a temporary
folder, so a stop loses its data, like a Redis restarted empty, and nothing lands in the
repository. tests/e2e/test_statestore.py and bench/bench_statestore.py use these.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.fixtures import ROOT

START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


class RedisServer:
    """redis-server on 127.0.0.1:port; stop() and start() again keep the port (data is lost)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir, self.port = workdir, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with self.client() as c:
                    c.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > until:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Replica:
    """One `rnnserve-server` process; address is 127.0.0.1:PORT once started."""

    def __init__(self, name: str, repo: str, workdir: Path, args: list[str]) -> None:
        self.name, self.repo, self.workdir, self.args = name, repo, workdir, args
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.log = workdir / f"{name}.log"
        self._log_file = None

    def start(self) -> Replica:
        self.launch()
        return self.wait_ready()

    @property
    def _port_file(self) -> Path:
        return self.workdir / f"{self.name}.port"

    def launch(self) -> None:
        port_file = self._port_file
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rnnserve.serve", "--repository", self.repo, "--port", "0",
             "--port-file", str(port_file), "--threads", "1", "--grace", "10", "--no-warmup",
             "--log-level", "WARNING", *self.args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._open_log(), env=dict(os.environ))

    def wait_ready(self) -> Replica:
        port_file = self._port_file
        until = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > until:
                raise RuntimeError(f"replica {self.name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"
        return self

    def _open_log(self):
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.log, "ab")   # the process writes it until it exits
        return self._log_file

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no drain, nothing answered."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> int:
        """SIGTERM: the server drains (in-flight calls finish) and exits; returns its exit status."""
        if not self.alive():
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def start_replicas(repo: str, workdir: Path, store_url: str, n: int = 2, extra: list[str] = ()) -> list[Replica]:
    """n replicas sharing store_url, started together (they load in parallel)."""
    replicas = [Replica(f"r{i}", repo, workdir, ["--state-store", store_url, *extra]) for i in range(n)]
    for r in replicas:
        r.launch()
    for r in replicas:
        r.wait_ready()
    return replicas
