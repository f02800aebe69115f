"""Per-model serving settings that export and serve share (pure Python).

The server's defaults (serve/settings.py ServeSettings) and the values export writes
into config.pbtxt (export/tritonconfig.py) come from here, so a generated
config.pbtxt restates what the server does anyway. A model's config.pbtxt may
override them for that model (docs: README "Per-model settings").
"""
from __future__ import annotations

MAX_BATCH_SIZE = 32                  # rows in one onnxruntime run
MAX_QUEUE_DELAY_US = 500             # how long the batcher may wait to grow a batch
SEQUENCE_IDLE_US = 60_000_000        # an idle sequence is freed after this long
INSTANCES = 1                        # runs of one model that may be in progress at once

# config.pbtxt `parameters` keys the server reads.
PARAM_ALLOW_NONFINITE = "allow_nonfinite"   # "true": float inputs may hold NaN/Inf
