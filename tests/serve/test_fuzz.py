"""2,000 seeded malformed requests against a real server (bench/fuzz.py has the generator and
runs 100,000): no INTERNAL, no hang, nothing logged as an error, the server alive, the same
answers afterwards."""
from __future__ import annotations

import logging

from bench.fuzz import fuzz
from tests.fixtures import serving


def test_fuzzed_requests_never_get_internal(hello_repo, caplog):
    caplog.set_level(logging.ERROR)
    with serving(hello_repo, max_generate_tokens=16, warmup=False) as (server, address):
        counts = fuzz(address, 2000, seed=1, workers=8, model="emb-lstm", vocab=4, text="hello")
        assert server.dataplane.server_live() and server.dataplane.server_ready()
    assert sum(v for k, v in counts.items() if k != "IN_STREAM_ERROR") == 2000
    assert counts["INVALID_ARGUMENT"] > 500 and counts["OK"] > 100
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:3]
