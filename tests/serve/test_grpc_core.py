"""serve/grpc_core.py: the GRPC_EXPERIMENTS rnnserve-server runs with (tests/e2e/test_flags.py checks
that a real server process logs it and that grpc knows every experiment named)."""
from __future__ import annotations

import grpc  # noqa: F401 - loaded, as in any process that made a server before main() ran

from rnnserve.serve.grpc_core import EXPERIMENTS_ENV, SERVER_EXPERIMENTS, prepare_environment, server_experiments


def test_the_server_default_unless_the_environment_says_otherwise():
    assert server_experiments({}) == SERVER_EXPERIMENTS
    assert server_experiments({EXPERIMENTS_ENV: "-event_engine_client"}) == "-event_engine_client"
    assert server_experiments({EXPERIMENTS_ENV: ""}) == ""   # empty: grpc's own defaults


def test_nothing_changes_once_grpc_is_loaded():
    environ: dict[str, str] = {}
    assert prepare_environment(environ) is None and environ == {}
