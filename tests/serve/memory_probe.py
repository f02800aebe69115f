"""A fresh process for tests/serve/test_memory_release.py: resident sizes are process-wide, so
they are measured where nothing else (earlier tests, their threads, torch) allocates.

    python -m tests.serve.memory_probe REPO release|trimmer|none

Loads REPO (charlm_repo) as the server would, runs charlm once over ROWS x STEPS tokens, then
gives memory back as the mode says (release: Repository.release_memory; trimmer: a running
Trimmer with that hook, waited for up to 10 s; none: nothing) and prints one JSON line:
{"grown": bytes the run left resident, "left": bytes still resident at the end}.
"""
from __future__ import annotations

import gc
import json
import sys
import time

import numpy as np

from rnnserve.serve.memory import TRIM_STEP_BYTES, Trimmer, map_large_blocks, resident_bytes
from tests.fixtures import make_dataplane

ROWS, STEPS = 32, 8000     # about 150 MB of intermediates for charlm's 2-layer LSTM
KEPT = 2 * TRIM_STEP_BYTES  # what the trimmer mode waits to get under


def main(repo: str, mode: str) -> int:
    map_large_blocks()         # as in the server (the Trimmer does it)
    dp = make_dataplane(repo, max_seq_len=STEPS)
    gc.collect()
    base = resident_bytes()
    trimmer = Trimmer(release=dp.repo.release_memory, interval=0.05) if mode == "trimmer" else None
    out = dp.engine("charlm").inst.run({"tokens": np.ones((ROWS, STEPS), np.int64)})
    assert out["logits"].shape[:2] == (ROWS, STEPS)
    del out
    grown = resident_bytes() - base
    if mode == "release":
        dp.repo.release_memory()
    elif trimmer is not None:
        until = time.monotonic() + 10
        while resident_bytes() - base >= KEPT and time.monotonic() < until:
            time.sleep(0.05)
        trimmer.close()
    print(json.dumps({"grown": grown, "left": resident_bytes() - base}))
    dp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
