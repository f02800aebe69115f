"""onnxruntime's CPU arena keeps a large run's buffers; the Trimmer's release hook hands them back.

Real models from charlm_repo and real onnxruntime runs, in a process of their own
(tests/serve/memory_probe.py) so that its resident size (/proc) is the run's alone: a run over
many row-steps leaves about 150 MB in the arena, and Repository.release_memory (what the
server's Trimmer calls) returns it. Without a release it stays (the "none" mode shows the
measurement can tell).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures import ROOT
from tests.serve.memory_probe import KEPT

MB = 2**20


def _probe(repo: str, mode: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-m", "tests.serve.memory_probe", repo, mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["grown"], found["left"]


def test_without_a_release_the_arena_keeps_the_run(charlm_repo):
    grown, left = _probe(charlm_repo, "none")
    assert grown > 2 * KEPT, f"the run left only {grown / MB:.0f} MB: too small to tell"
    assert left > 2 * KEPT


@pytest.mark.parametrize("mode", ["release", "trimmer"])
def test_the_arena_hands_its_memory_back(charlm_repo, mode):
    """release: Repository.release_memory once; trimmer: the Trimmer, which calls it when the
    process has grown (it may already do so during the run, so only the end is checked)."""
    grown, left = _probe(charlm_repo, mode)
    if mode == "release":
        assert grown > 2 * KEPT, f"the run left only {grown / MB:.0f} MB: too small to tell"
    assert left < KEPT, f"{left / MB:.0f} of {grown / MB:.0f} MB still resident"
