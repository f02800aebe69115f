"""Checkpoints that rebuild their own model (the nanoGPT habit).

A checkpoint is a dict saved with torch.save:
    {"format": "rnnserve-checkpoint/1", "state_dict", "model_config", "vocab",
     "train_config", "metrics", "torch_version"}
so `load_checkpoint(path)` needs no other flags.
"""
from __future__ import annotations

import io
import logging
import os
from typing import Any

import torch

from rnnserve.files import atomic_write_bytes
from rnnserve.train.model import CharRNN, ModelConfig

log = logging.getLogger(__name__)

FORMAT = "rnnserve-checkpoint/1"
WHAT_TO_GIVE = "give a checkpoint.pt written by rnnserve-train (e.g. runs/hello/emb-lstm/checkpoint.pt)"
REQUIRED_KEYS = ("state_dict", "model_config", "vocab", "train_config", "metrics", "torch_version")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or not an rnnserve checkpoint."""


def save_checkpoint(path: str, model: CharRNN, vocab: list[str], train_config: dict[str, Any],
                    metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    ckpt = {
        "format": FORMAT,
        "state_dict": model.state_dict(),
        "model_config": model.cfg.to_dict(),
        "vocab": list(vocab),
        "train_config": dict(train_config),
        "metrics": dict(metrics),
        "torch_version": str(torch.__version__),
    }
    if extra:
        ckpt.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load and validate the checkpoint dict, with clear errors."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}; {WHAT_TO_GIVE}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; {WHAT_TO_GIVE}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path} is not a torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); {WHAT_TO_GIVE}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not an rnnserve checkpoint (it holds a {type(ckpt).__name__}); "
                              f"{WHAT_TO_GIVE}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not an rnnserve checkpoint (no {', '.join(missing)}); {WHAT_TO_GIVE}")
    return ckpt


def load_checkpoint(path: str) -> tuple[CharRNN, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone. Returns (model in eval mode, ckpt dict)."""
    ckpt = read_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
        model = CharRNN(cfg)
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise CheckpointError(f"{path}: cannot rebuild the model: {e}") from e
    if len(ckpt["vocab"]) != cfg.vocab_size:
        raise CheckpointError(f"{path}: vocab has {len(ckpt['vocab'])} entries, model expects {cfg.vocab_size}")
    model.eval()
    return model, ckpt
