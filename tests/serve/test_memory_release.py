"""onnxruntime's CPU arena keeps a large run's buffers; the Trimmer's release hook hands them back.

Real models from charlm_repo, real onnxruntime runs, and this process's resident size
(/proc): a run over many row-steps leaves tens of MB in the arena, and
Repository.release_memory (what the server's Trimmer calls) returns them.
"""
from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from rnnserve.serve.memory import TRIM_STEP_BYTES, Trimmer, map_large_blocks, resident_bytes
from tests.fixtures import make_dataplane

MB = 2**20
ROWS, STEPS = 32, 8000     # about 150 MB of intermediates for charlm's 2-layer LSTM
# What may stay after a release: the heap's own change (3-13 MB seen), not the arena's 150 MB.
# The Trimmer stops once the process is under TRIM_STEP_BYTES above its start, so twice that.
KEPT = 2 * TRIM_STEP_BYTES


@pytest.fixture()
def dataplane(charlm_repo):
    # As in the server (the Trimmer does it): large blocks come from the OS and go back when freed,
    # so a run's growth is its own, not free heap left behind by earlier tests.
    map_large_blocks()
    gc.collect()   # earlier tests' sessions and their arenas go now, not in the middle of a measurement
    dp = make_dataplane(charlm_repo, max_seq_len=STEPS)
    yield dp
    dp.close()


def _large_run(dp) -> int:
    """Run charlm once over ROWS x STEPS directly (no response kept); -> resident growth in bytes."""
    inst = dp.engine("charlm").inst
    before = resident_bytes()
    out = inst.run({"tokens": np.ones((ROWS, STEPS), np.int64)})
    assert out["logits"].shape[:2] == (ROWS, STEPS)
    del out
    return resident_bytes() - before


def test_release_memory_empties_the_arena(dataplane):
    base = resident_bytes()
    grown = _large_run(dataplane)
    assert grown > 2 * KEPT, f"the run left only {grown / MB:.0f} MB: too small to tell"
    dataplane.repo.release_memory()
    left = resident_bytes() - base
    assert left < KEPT, f"{left / MB:.0f} of {grown / MB:.0f} MB still resident"
    # The model still answers, exactly as before.
    again = dataplane.engine("charlm").inst.run({"tokens": np.ones((2, 8), np.int64)})["logits"]
    first = dataplane.engine("charlm").inst.run({"tokens": np.ones((2, 8), np.int64)})["logits"]
    assert np.array_equal(again, first)


def test_trimmer_releases_the_arena_when_the_process_has_grown(dataplane):
    """The same run as above (which leaves over 64 MB in the arena when nothing releases it), with
    the Trimmer watching: it may already release during the run, so only the end is checked."""
    base = resident_bytes()
    trimmer = Trimmer(release=dataplane.repo.release_memory, interval=0.05)
    try:
        _large_run(dataplane)
        until = time.monotonic() + 10
        while resident_bytes() - base >= KEPT and time.monotonic() < until:
            time.sleep(0.05)
        left = resident_bytes() - base
        assert left < KEPT, f"{left / MB:.0f} MB still resident after 10 s"
    finally:
        trimmer.close()
