"""Recurrent ONNX models that rnnserve did not export: torch modules written here, exported with
torch.onnx under names and layouts we never use, without our metadata. Each comes with a
config.pbtxt in Triton's schema, and a reference that runs the file with onnxruntime."""
from __future__ import annotations

import os
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from rnnserve.contract import build_general_metadata
from rnnserve.modelspec import ModelSpec, StatePair, TensorDecl

F, H1 = 3, 8          # features model: features per step, GRU hidden
CHUNK, H2 = 64, 128   # chunk model: samples per chunk, state [2, batch, 128]
H4 = 8                # two-state model


class Features(nn.Module):
    """float features [N, T, F] -> y [N, T, 2]; state hidden_in/hidden_out [1, N, H1]; time-major inside."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(F, H1)          # batch_first=False
        self.head = nn.Linear(H1, 2)

    def forward(self, features, hidden_in):
        out, hidden = self.gru(features.transpose(0, 1), hidden_in)
        return self.head(out).transpose(0, 1), hidden


class Chunk(nn.Module):
    """input [batch, 64] + sr (rank-0 INT64) -> output [batch, 1]; state [2, batch, 128] (h and c stacked)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(CHUNK, 32)
        self.cell = nn.LSTMCell(32, H2)
        self.head = nn.Linear(H2, 1)

    def forward(self, input, state, sr):
        x = torch.tanh(self.proj(input)) * (sr.to(torch.float32) / 16000.0)
        h, c = self.cell(x, (state[0], state[1]))
        return torch.sigmoid(self.head(h)), torch.stack([h, c])


class Fixed(nn.Module):
    """x [1, T, F] -> y [1, T, 2]; state h/hn [1, 1, H1]: the batch is fixed at 1 in the graph."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(F, H1, batch_first=True)
        self.head = nn.Linear(H1, 2)

    def forward(self, x, h):
        out, hn = self.rnn(x, h)
        return self.head(out), hn


class TwoStates(nn.Module):
    """x [B, T, F] -> y [B, T, 4]; states h_prev -> h_next and c -> new_c, each [2, B, H4]
    (the output names sort in the other order than the input names)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(F, H4, num_layers=2, batch_first=True)
        self.head = nn.Linear(H4, 4)

    def forward(self, x, h_prev, c):
        out, (h, c2) = self.lstm(x, (h_prev, c))
        return self.head(out), h, c2


def _export(module: nn.Module, args: tuple, path: str, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.onnx.export(module.eval(), args, path, dynamo=False, opset_version=17, input_names=inputs,
                      output_names=outputs, dynamic_axes=axes)


def build(root: str) -> dict[str, str]:
    """Export the four models under root; -> name -> model.onnx."""
    torch.manual_seed(0)
    paths = {n: os.path.join(root, "onnx", n, "model.onnx") for n in ("features", "chunk", "fixed", "two")}
    _export(Features(), (torch.randn(2, 5, F), torch.zeros(1, 2, H1)), paths["features"],
            ["features", "hidden_in"], ["y", "hidden_out"],
            {"features": {0: "N", 1: "T"}, "hidden_in": {1: "N"}, "y": {0: "N", 1: "T"}, "hidden_out": {1: "N"}})
    _export(Chunk(), (torch.randn(2, CHUNK), torch.zeros(2, 2, H2), torch.tensor(16000)), paths["chunk"],
            ["input", "state", "sr"], ["output", "stateN"],
            {"input": {0: "batch"}, "state": {1: "batch"}, "output": {0: "batch"}, "stateN": {1: "batch"}})
    _export(Fixed(), (torch.randn(1, 5, F), torch.zeros(1, 1, H1)), paths["fixed"], ["x", "h"], ["y", "hn"],
            {"x": {1: "T"}, "y": {1: "T"}})
    _export(TwoStates(), (torch.randn(2, 5, F), torch.zeros(2, 2, H4), torch.zeros(2, 2, H4)), paths["two"],
            ["x", "h_prev", "c"], ["y", "h_next", "new_c"],
            {"x": {0: "B", 1: "T"}, "h_prev": {1: "B"}, "c": {1: "B"}, "y": {0: "B", 1: "T"},
             "h_next": {1: "B"}, "new_c": {1: "B"}})
    return paths


# Triton-schema config.pbtxt files (max_batch_size 0: full shapes, -1 = dynamic).
CONFIGS = {
    "features": """
        platform: "onnxruntime_onnx"
        max_batch_size: 0
        input [ { name: "features" data_type: TYPE_FP32 dims: [ -1, -1, 3 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, -1, 2 ] } ]
        sequence_batching {
          max_sequence_idle_microseconds: 5000000
          oldest { max_candidate_sequences: 8 max_queue_delay_microseconds: 100 }
          state [ { input_name: "hidden_in" output_name: "hidden_out" data_type: TYPE_FP32 dims: [ 1, -1, 8 ]
                    initial_state { data_type: TYPE_FP32 dims: [ 1, 1, 8 ] zero_data: true name: "zeros" } } ]
        }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        parameters { key: "allow_nonfinite" value { string_value: "true" } }
        model_warmup [ { name: "w" batch_size: 1 } ]
    """,
    "chunk": """
        max_batch_size: 0
        input [ { name: "input" data_type: TYPE_FP32 dims: [ -1, 64 ] },
                { name: "sr" data_type: TYPE_INT64 dims: [ ] } ]
        output [ { name: "output" data_type: TYPE_FP32 dims: [ -1, 1 ] } ]
        sequence_batching { state [ { input_name: "state" output_name: "stateN" data_type: TYPE_FP32
                                      dims: [ 2, -1, 128 ] } ] }
    """,
    "fixed": """
        max_batch_size: 0
        sequence_batching { state [ { input_name: "h" output_name: "hn" data_type: TYPE_FP32 dims: [ 1, 1, 8 ] } ] }
    """,
    "two": """
        max_batch_size: 0
        sequence_batching { state [
          { input_name: "c" output_name: "new_c" data_type: TYPE_FP32 dims: [ 2, -1, 8 ] },
          { input_name: "h_prev" output_name: "h_next" data_type: TYPE_FP32 dims: [ 2, -1, 8 ] } ] }
    """,
}


# The features model as a format-2 export describes it (rnnserve.io metadata).
FEATURES_SPEC = ModelSpec(
    inputs=(TensorDecl("features", "float32", ("batch", "seq", F), batch_axis=0, time_axis=1),),
    outputs=(TensorDecl("y", "float32", ("batch", "seq", 2), batch_axis=0, time_axis=1),),
    states=(StatePair("hidden_in", "hidden_out", "float32", (1, "batch", H1), batch_axis=1),))


def with_metadata(path: str, out: str, spec: ModelSpec) -> str:
    """A copy of the model file with our format-2 metadata."""
    proto = onnx.load(path)
    props = build_general_metadata(spec=spec, torch_version=torch.__version__, onnx_version=onnx.__version__,
                                   opset=17, feature_names=["a", "b", "c"])
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    onnx.save(proto, out)
    return out


def publish(repo: str, name: str, model_path: str, config: str | None = None) -> None:
    """REPO/name/1/model.onnx (+ REPO/name/config.pbtxt)."""
    os.makedirs(os.path.join(repo, name, "1"), exist_ok=True)
    with open(model_path, "rb") as src, open(os.path.join(repo, name, "1", "model.onnx"), "wb") as dst:
        dst.write(src.read())
    if config is not None:
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(textwrap.dedent(config))


class Reference:
    """The model file run by onnxruntime directly, the state carried by the caller."""

    def __init__(self, path: str, name: str):
        self.name = name
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
