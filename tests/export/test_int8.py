"""int8 options (export/int8.py): each builds the graph it names, on a real export, with real onnxruntime."""
from __future__ import annotations

import logging

import onnx
import pytest
import torch

from rnnserve.export.int8 import DEFAULT_INT8, INT8_OPTIONS, Int8Options, build_int8, op_counts, part_nodes
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.parity import make_session
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.model import CharRNN, ModelConfig


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for arch in ("lstm", "gru"):
        torch.manual_seed(0)
        model = CharRNN(ModelConfig(arch=arch, vocab_size=10, emb_size=8, hidden_size=16, num_layers=2))
        path = str(root / arch / "checkpoint.pt")
        save_checkpoint(path, model, list("abcdefghij"), {"task": "random", "seq_len": 8}, {})
        out[arch] = export_checkpoint(path, str(root / arch / "out"), gate=False, threads=1).onnx_path
    return out


@pytest.mark.parametrize("option", list(INT8_OPTIONS))
def test_each_lstm_option_builds_what_it_names(option, exported, tmp_path):
    opts = INT8_OPTIONS[option]
    dst = str(tmp_path / "model.onnx")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    info = build_int8(exported["lstm"], dst, str(tmp_path / "work"), "lstm", opts)
    assert (root.handlers, root.level) == (handlers, level)  # onnxruntime's basicConfig undone
    ops = op_counts(onnx.load(dst))
    fp32_layers = len({"first_recurrent", "last_recurrent"} & set(opts.fp32))
    assert ops.get("LSTM", 0) == fp32_layers and ops.get("DynamicQuantizeLSTM") == 2 - fp32_layers
    assert ("MatMulInteger" in ops) == ("head" not in opts.fp32)
    assert ("head" in opts.fp32) == (ops.get("MatMul") == 1)
    assert "refuse" not in info and info["options"] == opts.describe()
    make_session(dst, 1)  # onnxruntime loads it


def test_parts_and_gru(exported, tmp_path):
    parts = part_nodes(onnx.load(exported["gru"]))
    assert len(parts["head"]) == 1 and len(parts["embedding"]) == 1
    assert parts["first_recurrent"] != parts["last_recurrent"]
    # No int8 GRU kernel in onnxruntime: with the head kept float32 nothing is left to quantize.
    info = build_int8(exported["gru"], str(tmp_path / "g.onnx"), str(tmp_path / "w"), "gru", INT8_OPTIONS[DEFAULT_INT8])
    assert "nothing was quantized" in info["refuse"] and info["float32_recurrent_ops"] == {"GRU": 2}
    info = build_int8(exported["gru"], str(tmp_path / "h.onnx"), str(tmp_path / "w"), "gru", Int8Options())
    assert info["quantized_ops"].get("MatMulInteger") == 1 and "refuse" not in info
    with pytest.raises(ValueError, match="unknown part"):
        Int8Options(fp32=("decoder",))
