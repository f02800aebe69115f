"""An fp16 variant (export/variants.py, as `rnnserve-export batch --variants fp16` makes it) loads
and serves on CPU. onnxruntime 1.32 segfaulted creating its session at ORT_ENABLE_ALL (the
NchwcTransformer; serve/engine/runtime.py disables it), which would kill pytest, so the server side
runs in a child process whose exit status is checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from rnnserve.export.variants import EvalText, make_variant
from tests.fixtures import CHARLM_VOCAB, copy_repo

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from rnnserve.serve.dataplane.plane import DataPlane
    from rnnserve.serve.settings import ServeSettings
    from rnnserve.serve.wire.types import InferRequest

    dp = DataPlane(ServeSettings(repository=sys.argv[1], device="cpu", intra_op_threads=1))
    dp.load()
    tokens = np.array([[int(t) for t in sys.argv[2].split(",")]], dtype=np.int64)
    out = {"index": {e.name: [e.state, e.reason] for e in dp.admin.repository_index()}}
    for model in ("charlm", "charlm-fp16"):
        resp = dp.infer(InferRequest(model_name=model, inputs={"tokens": tokens}, requested_outputs=["logits"]))
        out[model] = dict(resp.outputs)["logits"].tolist()
        out[model + " predict"] = dp.predict_text(model, "hello world").decoded
    dp.close()
    print(json.dumps(out))
""")


def test_fp16_variant_loads_and_serves(charlm_repo, tmp_path):
    repo = copy_repo(charlm_repo, str(tmp_path / "repo"))
    text = "the quick brown fox jumps over the lazy dog. " * 12
    ids = np.array([CHARLM_VOCAB.index(c) for c in text], dtype=np.int64)
    res = make_variant("fp16", os.path.join(repo, "charlm", "2", "model.onnx"),
                       os.path.join(repo, "charlm-fp16", "2"), str(tmp_path / "work"), model=None,
                       train_seq_len=16, base_ref="charlm/2", text=EvalText(ids, "test"), min_agreement=0.0,
                       threads=1)
    assert res.accepted
    child = subprocess.run([sys.executable, "-c", CHILD, repo, ",".join(str(i) for i in ids[:40])],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stderr[-3000:]}"
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["index"]["charlm-fp16"] == ["READY", ""]
    fp32, fp16 = np.array(out["charlm"]), np.array(out["charlm-fp16"])
    assert fp16.shape == fp32.shape == (1, 40, len(CHARLM_VOCAB))
    diff = float(np.abs(fp16 - fp32).max())
    assert 0 < diff <= 2 * res.report["max_logit_diff"] + 1e-3   # really fp16, and as close as measured at export
    assert len(out["charlm-fp16 predict"]) == len("hello world")
