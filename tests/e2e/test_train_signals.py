"""Ctrl-C (SIGINT) and SIGTERM during `rnnserve-train --task charlm`, as real signals to a real
training process: it saves last.pt and loss.png, prints a one-line resume hint, exits 130, and
the hint's command resumes from the saved step."""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.fixtures import ROOT

SMALL = ["--seq-len", "16", "--batch-size", "8", "--hidden-size", "24", "--num-layers", "1", "--emb-size", "8",
         "--bf16", "false", "--threads", "1", "--eval-interval", "1000", "--log-interval", "5"]


def _wait_for_steps(metrics, proc, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and any('"train"' in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError("no training step logged")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_last_pt_and_the_plot_and_exits_130(sig, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sees the dog. a dog likes the fish.\n" * 200)
    out = tmp_path / "run"
    args = ["--task", "charlm", "--corpus", str(corpus), "--out", str(out), "--time-budget", "5",
            "--no-progress", *SMALL]
    proc = subprocess.Popen([sys.executable, "-m", "rnnserve.train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out / "metrics.jsonl", proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    hint = [line for line in err.splitlines() if "Resume with: " in line]
    assert len(hint) == 1 and hint[0].startswith(f"{sig.name}: stopped at step "), err
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert f"stopped at step {state['step']};" in hint[0]
    assert (out / "loss.png").stat().st_size > 1000
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == {**events[-1], "event": "interrupted", "step": state["step"], "signal": sig.name}

    if sig != signal.SIGINT:
        return
    # The hint's command continues from that step, with what was left of the 5 minutes.
    command = shlex.split(hint[0].split("Resume with: ", 1)[1])
    assert command[0] == "rnnserve-train" and "--resume" in command
    left = float(command[command.index("--time-budget") + 1])
    assert 4.0 < left <= 5.0   # printed to 0.01 min: a run stopped within 0.3 s shows 5.00
    command[command.index("--time-budget") + 1] = "0.01"   # not minutes more in a test
    done = subprocess.run([sys.executable, "-m", "rnnserve.train", *command[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {out / 'last.pt'} at step {state['step']}" in done.stderr
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["step"] > state["step"]
