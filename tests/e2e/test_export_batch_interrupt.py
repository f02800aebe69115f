"""Ctrl-C during `rnnserve-export batch`, as a real SIGINT to a real process: it exits 130 with one
line and no traceback, and the repository holds only whole models (no staging folder left)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from rnnserve.export.publish import STAGING_PREFIX
from tests.fixtures import ROOT


def test_ctrl_c_leaves_a_consistent_repository(hello_built, tmp_path):
    ckpts = tmp_path / "ckpts"
    for key, path in hello_built.checkpoints.items():   # "<preset>/1" -> checkpoint.pt
        os.makedirs(ckpts / key.split("/")[0])
        shutil.copy(path, ckpts / key.split("/")[0] / "checkpoint.pt")
    repo = tmp_path / "repo"
    proc = subprocess.Popen([sys.executable, "-m", "rnnserve.export", "batch", "--checkpoints", str(ckpts),
                             "--repository", str(repo), "--threads", "1", "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:   # a model published, more to come
            if repo.is_dir() and any(p.name.isdigit() for d in repo.iterdir() if d.is_dir() for p in d.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: the models published so far are complete" in err
    assert not [d for d in os.listdir(repo) if d.startswith(STAGING_PREFIX)]
    for model in (d for d in repo.iterdir() if d.is_dir()):
        for version in (v for v in model.iterdir() if v.name.isdigit()):
            assert (version / "model.onnx").is_file()
