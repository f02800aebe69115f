"""gRPC core settings that rnnserve-server puts in its own environment before grpc is imported:
grpc reads GRPC_EXPERIMENTS once, when it loads, so they cannot be server options.

`-event_engine_listener`: with gRPC's EventEngine listener (grpc's default), the bytes of every
message on an accepted connection are read on EventEngine's thread pool and handed over to the
grpc.aio poller thread; with the classic listener the poller thread reads them itself. That is
two to three thread switches fewer per streamed message, and on a small machine the switches,
not the reading, are what a message costs (the README's streaming table, bench.bench_batching).
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, MutableMapping

EXPERIMENTS_ENV = "GRPC_EXPERIMENTS"
SERVER_EXPERIMENTS = "-event_engine_listener"


def server_experiments(environ: Mapping[str, str]) -> str:
    """The GRPC_EXPERIMENTS a server process runs with: the environment's own value when it has
    one (an empty value keeps grpc's defaults), else SERVER_EXPERIMENTS."""
    return environ.get(EXPERIMENTS_ENV, SERVER_EXPERIMENTS)


def prepare_environment(environ: MutableMapping[str, str]) -> str | None:
    """Put server_experiments() in `environ` (this process's, before grpc is imported). -> what
    grpc will read, or None when grpc is loaded already (a server made in a process that
    imported grpc first, such as a test: too late, and nothing is changed)."""
    if "grpc" in sys.modules:
        return None
    environ[EXPERIMENTS_ENV] = server_experiments(environ)
    return environ[EXPERIMENTS_ENV]
