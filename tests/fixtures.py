"""Builders for the model repositories the tests serve (used by tests/conftest.py).

Everything is real: the hello models are trained with train_hello, every model is
exported with our export code, and the result is a Triton-style repository
REPO/<model>/<version>/model.onnx.
"""
from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch

from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.frontend.server import create_server
from rnnserve.serve.settings import ServeSettings
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.hello import train_hello
from rnnserve.train.model import PRESET_NAMES, CharRNN, ModelConfig

ROOT = Path(__file__).resolve().parents[1]   # the repository

# A small alphabet for the random-weight char models (every character is one token).
CHARLM_VOCAB = list(" abcdefghijklmnopqrstuvwxyz.,!?\n")
CHARLM_MODELS = {
    # name: (model config, {version: seed})
    "charlm": (dict(arch="lstm", encoding="embedding", emb_size=8, hidden_size=16, num_layers=2), {1: 1, 2: 2}),
    "chargru": (dict(arch="gru", encoding="onehot", hidden_size=12, num_layers=1), {1: 3}),
    "bigru": (dict(arch="gru", encoding="embedding", emb_size=8, hidden_size=12, num_layers=2,
                   bidirectional=True), {1: 4}),
}


@dataclass
class BuiltRepo:
    path: str
    checkpoints: dict[str, str] = field(default_factory=dict)   # "<model>/<version>" -> checkpoint.pt
    predicted: dict[str, str] = field(default_factory=dict)     # hello: preset -> PyTorch's answer for "hello"


def _export_into(repo: str, name: str, version: int, ckpt_path: str) -> str:
    out_dir = os.path.join(repo, name, str(version))
    export_checkpoint(ckpt_path, out_dir, gate=False, threads=1)
    return os.path.join(out_dir, "model.onnx")


def build_hello_repo(root: str) -> BuiltRepo:
    """Train the five presets on hello -> ohlol and export each as REPO/<preset>/1/model.onnx."""
    built = BuiltRepo(path=os.path.join(root, "repo"))
    for preset in PRESET_NAMES:
        result = train_hello(preset, os.path.join(root, "ckpt", preset), verbose=False)
        _export_into(built.path, preset, 1, result.ckpt_path)
        built.checkpoints[f"{preset}/1"] = result.ckpt_path
        built.predicted[preset] = result.predicted
    return built


def build_charlm_repo(root: str) -> BuiltRepo:
    """Random-weight char models (a 2-layer LSTM in two versions, a GRU, a bidirectional GRU)."""
    built = BuiltRepo(path=os.path.join(root, "repo"))
    vocab = CHARLM_VOCAB
    for name, (cfg_kwargs, versions) in CHARLM_MODELS.items():
        for version, seed in versions.items():
            torch.manual_seed(seed)
            model = CharRNN(ModelConfig(vocab_size=len(vocab), **cfg_kwargs)).eval()
            ckpt = os.path.join(root, "ckpt", name, str(version), "checkpoint.pt")
            save_checkpoint(ckpt, model, vocab, {"task": "charlm", "seq_len": 16, "seed": seed}, {})
            _export_into(built.path, name, version, ckpt)
            built.checkpoints[f"{name}/{version}"] = ckpt
    return built


def copy_repo(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def make_dataplane(repo: str, **overrides) -> DataPlane:
    """A loaded DataPlane on CPU with one onnxruntime thread (the test machine is shared)."""
    dp = DataPlane(ServeSettings(repository=repo, device="cpu", **{"intra_op_threads": 1, **overrides}))
    dp.load()
    return dp


# The five seed models, as the test servers name them.
HELLO_MODELS = PRESET_NAMES
# max_seq_len of the test servers (small, so the "seq too long" rule is cheap to hit).
MAX_SEQ_LEN = 64
# Time chunks (tests/serve/test_chunking.py, test_sequence_chunks.py): requests of 3 rows x
# CHUNK_STEPS steps run as a few dozen steps per chunk under CHUNK_BUDGET.
CHUNK_STEPS = 400
CHUNK_BUDGET = 64 * 1024


@contextmanager
def serving(repository: str, **overrides):
    """A started server on 127.0.0.1, port 0; yields (server, 'host:port')."""
    settings = ServeSettings(repository=repository, host="127.0.0.1", port=0,
                             max_seq_len=MAX_SEQ_LEN, intra_op_threads=1, grpc_workers=8,
                             grace=2.0, **overrides)
    server, port = create_server(settings)
    server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


# Tiny forecaster settings and data (tests/train/test_forecast.py, tests/serve/test_forecast_serving.py).
TINY_FORECAST = dict(hidden_size=8, seq_len=32, batch_size=8, max_steps=30, eval_interval=15)


def hourly_csv(path, n=500, seed=0) -> str:
    """A synthetic hourly series: a daily cycle, a trend, noise, a wind column and a categorical sky."""
    rng = np.random.default_rng(seed)
    t0 = datetime(2021, 3, 1)
    with open(path, "w") as f:
        f.write("time,temp,wind,sky\n")
        for i in range(n):
            temp = 10 + 5 * math.sin(2 * math.pi * i / 24) + 0.01 * i + rng.normal(0, 0.3)
            sky = ["sun", "fog", "rain"][(i // 7) % 3]
            stamp = (t0 + timedelta(hours=i)).strftime("%Y-%m-%d %H:%M")
            f.write(f"{stamp},{temp:.3f},{rng.uniform(0, 9):.2f},{sky}\n")
    return str(path)
