"""A vocabulary of multi-character tokens (a word-level model): export refuses it, and a server that
finds such a model (written by other means) refuses text for it while token ids still work."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rnnserve.export.onnx_export import ExportError, export_checkpoint, export_model
from rnnserve.serve.errors import InvalidArgument
from rnnserve.serve.wire.types import InferRequest
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.model import CharRNN, ModelConfig
from tests.fixtures import make_dataplane

WORDS = ["the", "cat", "sat", ".", " "]


def test_word_vocabularies_are_refused_for_text(tmp_path):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(arch="gru", vocab_size=len(WORDS), emb_size=4, hidden_size=6)).eval()
    ckpt = str(tmp_path / "words" / "checkpoint.pt")
    save_checkpoint(ckpt, model, WORDS, {"task": "words", "seq_len": 8}, {})
    with pytest.raises(ExportError, match=r"3 vocabulary tokens that are not one character \('the', 'cat', 'sat'\)"):
        export_checkpoint(ckpt, str(tmp_path / "out"), gate=False)
    assert not os.path.exists(tmp_path / "out" / "model.onnx")

    repo = tmp_path / "repo"
    os.makedirs(repo / "words" / "1")
    export_model(model, {"vocab": WORDS, "train_config": {"seq_len": 8}, "checkpoint_sha256": "0" * 64},
                 str(repo / "words" / "1" / "model.onnx"))
    dp = make_dataplane(str(repo), warmup=False)
    try:
        with pytest.raises(InvalidArgument, match="model 'words' has 3 vocabulary tokens .* send token ids"):
            dp.predict_text("words", "the cat")
        with pytest.raises(InvalidArgument, match="not one character"):
            dp.score("words", "the")
        out = dp.infer(InferRequest(model_name="words", inputs={"tokens": np.array([[0, 4, 1]], np.int64)}))
        assert out.outputs[0][1].shape == (1, 3, len(WORDS))
    finally:
        dp.close()
