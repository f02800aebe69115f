"""Real exported models for the batcher tests: tiny ones of every arch, each with its own
onnxruntime session, and run wrappers that hold a run at a gate or count the runs in progress."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.contract import parse_metadata
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.serve.engine.modelio import ModelIO, Work
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.model import CharRNN, ModelConfig

VOCAB = [chr(ord("a") + i) for i in range(12)]
ARCHS = {
    "rnncell": ModelConfig(arch="rnncell", vocab_size=12, encoding="onehot", hidden_size=12, head=False),
    "rnn": ModelConfig(arch="rnn", vocab_size=12, encoding="onehot", hidden_size=16, num_layers=2),
    "lstm": ModelConfig(arch="lstm", vocab_size=12, emb_size=8, hidden_size=16, num_layers=2),
    "gru": ModelConfig(arch="gru", vocab_size=12, emb_size=8, hidden_size=16, num_layers=3),
    "bilstm": ModelConfig(arch="lstm", vocab_size=12, emb_size=8, hidden_size=16, num_layers=2,
                          bidirectional=True),
}
UNIDIRECTIONAL = ["rnncell", "rnn", "lstm", "gru"]


class Model:
    """A real exported model: its session, I/O names and a plain run()."""

    def __init__(self, path: str):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.meta = parse_metadata(self.sess.get_modelmeta().custom_metadata_map)
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.io = ModelIO.from_spec(self.meta.spec, pad=self.meta.streamable)
        self.runs = 0

    def run(self, feeds):
        self.runs += 1
        return dict(zip(self.outputs, self.sess.run(None, feeds)))

    def zero(self, batch):
        shape = self.meta.state_shape(batch)
        return tuple(np.zeros(shape, np.float32) for _ in self.io.state_inputs)

    def rand_state(self, rng, batch):
        shape = self.meta.state_shape(batch)
        return tuple(rng.standard_normal(shape).astype(np.float32) for _ in self.io.state_inputs)

    def alone(self, tokens, states):
        return self.run({"tokens": tokens, **dict(zip(self.io.state_inputs, states))})


def work(tokens, states, **kwargs) -> Work:
    """Work for a char model: its tokens and states."""
    return Work({"tokens": tokens}, states, **kwargs)


def build_models(root: Path, names: Iterable[str] | None = None) -> dict[str, Model]:
    """Export each arch (all of ARCHS by default) with fixed random weights under root."""
    out = {}
    for i, (name, cfg) in enumerate(ARCHS.items()):
        if names is not None and name not in names:
            continue
        torch.manual_seed(i)
        ckpt = root / name / "checkpoint.pt"
        save_checkpoint(str(ckpt), CharRNN(cfg), VOCAB, {"task": "charlm", "seq_len": 16}, {})
        res = export_checkpoint(str(ckpt), str(root / name))
        out[name] = Model(res.onnx_path)
    return out


class GatedRun:
    """The real session run, held at a gate so the queue can be observed."""

    def __init__(self, model: Model):
        self.model, self.gate, self.entered = model, threading.Event(), threading.Event()

    def __call__(self, feeds):
        self.entered.set()
        self.gate.wait(30)
        return self.model.run(feeds)


class CountingRun:
    """The real session run, counting the runs in progress at once; each run waits at its own
    gate (a semaphore release lets one run through)."""

    def __init__(self, model: Model):
        self.model, self.gate = model, threading.Semaphore(0)
        self.lock, self.running, self.peak, self.rows = threading.Lock(), 0, 0, []

    def __call__(self, feeds):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.rows.append(int(feeds["tokens"].shape[0]))
        try:
            assert self.gate.acquire(timeout=30), "the test never let this run through"
            return self.model.run(feeds)
        finally:
            with self.lock:
                self.running -= 1

    def wait_running(self, n: int, timeout: float = 10.0) -> bool:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            with self.lock:
                if self.running >= n:
                    return True
            time.sleep(0.005)
        return False


class Runs:
    """A Batcher's on_run hook that keeps every serve.stats.RunRecord (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list = []

    def __call__(self, record) -> None:
        with self._lock:
            self.records.append(record)

    @property
    def execution_count(self) -> int:
        return len(self.records)

    @property
    def inference_count(self) -> int:
        return sum(r.rows for r in self.records)

    @property
    def batch_sizes(self) -> set[int]:
        return {r.rows for r in self.records}
