"""Checkpoint -> one self-describing model.onnx, guarded by the parity gate.

Exporter choice (torch 2.13), and why:
  * The default dynamo exporter silently fixes seq_len to the example length for
    nn.RNN and for an RNNCell loop, and for LSTM/GRU on a second export in the same
    process; it declares LSTM/GRU outputs with a fixed seq, fixes example dims of
    size 1, and has had a wrong GRU linear_before_reset (pytorch#189225).
  * The TorchScript exporter (dynamo=False, dynamic_axes) emits the native ONNX
    RNN/LSTM/GRU ops with dynamic batch and seq and matches PyTorch to ~1e-7.
  So we use the TorchScript exporter.  It is deprecated, hence the warning filter.
  * A Python loop over nn.RNNCell unrolls to a fixed length in every exporter, so
    the loop is exported as the single nn.RNN layer it is equal to (the cell's
    weights become weight_ih_l0 / weight_hh_l0 / bias_*_l0).  The parity gate runs
    against the ORIGINAL loop model, which is what proves the equivalence.
We never trust the declared shapes: check_io() fails loudly unless batch and seq are
symbolic dims and every other dim and dtype is what the I/O contract says.
The model is written to a temp file in out_dir and renamed to model.onnx only
after the gate passes.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.nn as nn

from rnnserve.contract import (
    DIM_BATCH,
    DIM_SEQ,
    MODEL_FILENAME,
    GraphTensor,
    ModelMeta,
    build_metadata,
    multichar_tokens,
    parse_metadata,
    text_api_refusal,
)
from rnnserve.export.parity import ATOL, DEFAULT_TRAIN_SEQ_LEN, RTOL, format_summary, run_parity
from rnnserve.files import atomic_write_json, file_sha256
from rnnserve.train.checkpoint import load_checkpoint, read_checkpoint
from rnnserve.train.forecast_model import is_forecast_checkpoint, load_forecaster
from rnnserve.train.model import CharRNN, ModelConfig

log = logging.getLogger(__name__)

# Opset 17: every op we emit (RNN/LSTM/GRU, OneHot, Gather, MatMul) is stable there,
# and it is well inside what onnxruntime >= 1.14 and Triton's ORT backend accept.
DEFAULT_OPSET = 17
PARITY_FILENAME = "parity.json"
FAILED_PARITY_FILENAME = "parity.failed.json"

_ONNX_DTYPES = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}
# Example sizes: >= 2 so the tracer cannot specialise a size-1 dim.
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 5


class ExportError(Exception):
    """The export failed (bad graph, wrong shapes, or the parity gate failed)."""


@dataclass
class ExportResult:
    onnx_path: str
    parity: dict[str, Any] | None  # None when gate=False
    seconds: float
    parity_path: str | None = None
    io: str = ""  # the checked declared I/O, e.g. "tokens[batch,seq], h0[1,batch,4] -> ..."


class _StreamingGraph(nn.Module):
    """(tokens, *state) -> (logits, *new_state): the graph's flat I/O."""

    def __init__(self, model: CharRNN):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        logits, new_state = self.model(tokens, tuple(state) if state else None)
        if not self.model.cfg.streamable:
            return logits
        return (logits, *new_state)


def as_native_rnn(model: CharRNN) -> CharRNN:
    """The rnncell loop as the one-layer nn.RNN it equals; other models unchanged."""
    cfg = model.cfg
    if cfg.arch != "rnncell":
        return model
    cell = model.cell
    if cell.nonlinearity != "tanh" or cell.bias is not True:
        raise ExportError(f"rnncell export supports tanh cells with bias only, got "
                          f"nonlinearity={cell.nonlinearity!r} bias={cell.bias}")
    rnn_cfg = ModelConfig.from_dict({**cfg.to_dict(), "arch": "rnn"})
    native = CharRNN(rnn_cfg)
    renames = {"cell.weight_ih": "rnn.weight_ih_l0", "cell.weight_hh": "rnn.weight_hh_l0",
               "cell.bias_ih": "rnn.bias_ih_l0", "cell.bias_hh": "rnn.bias_hh_l0"}
    state = {renames.get(k, k): v for k, v in model.state_dict().items()}
    native.load_state_dict(state)  # strict: any missing/extra weight is an error
    return native.eval()


def _dims(value_info: onnx.ValueInfoProto) -> list[Any]:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in value_info.type.tensor_type.shape.dim]


def check_io(proto: onnx.ModelProto, meta: ModelMeta) -> str:
    """Fail loudly unless the graph's declared I/O is exactly the contract; returns a one-line description."""
    want_in, want_out = meta.io_spec()
    problems = []
    for kind, got_list, want_list in (("input", proto.graph.input, want_in), ("output", proto.graph.output, want_out)):
        got_names = [v.name for v in got_list]
        if got_names != [w.name for w in want_list]:
            problems.append(f"{kind}s are {got_names}, expected {[w.name for w in want_list]}")
            continue
        for v, w in zip(got_list, want_list):
            if v.type.tensor_type.elem_type != _ONNX_DTYPES[w.dtype]:
                problems.append(f"{v.name}: dtype {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)}, "
                                f"expected {w.dtype}")
            dims = _dims(v)
            if dims != list(w.shape):
                problems.append(f"{v.name}: declared shape {dims}, expected {list(w.shape)} "
                                f"(strings are symbolic dims)")
    if problems:
        raise ExportError("exported graph breaks the I/O contract: " + "; ".join(problems))
    return describe_io(want_in, want_out)


def describe_io(inputs: list[GraphTensor], outputs: list[GraphTensor]) -> str:
    fmt = lambda specs: ", ".join(f"{s.name}[{','.join(map(str, s.shape))}]" for s in specs)  # noqa: E731
    return f"{fmt(inputs)} -> {fmt(outputs)}"


def export_model(model: CharRNN, ckpt_info: Mapping[str, Any], path: str, *,
                 opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export `model` to `path` with metadata; ckpt_info needs vocab, train_config, checkpoint_sha256."""
    cfg = model.cfg
    props = build_metadata(vocab=list(ckpt_info["vocab"]), model_config=cfg.to_dict(),
                           train_config=ckpt_info["train_config"],
                           checkpoint_sha256=ckpt_info["checkpoint_sha256"],
                           torch_version=torch.__version__, onnx_version=onnx.__version__, opset=opset)
    meta = parse_metadata(props)
    graph = _StreamingGraph(as_native_rnn(model)).eval()
    want_in, want_out = meta.io_spec()
    tokens = torch.randint(0, cfg.vocab_size, (_EXAMPLE_BATCH, _EXAMPLE_SEQ), dtype=torch.int64)
    states = tuple(torch.zeros(meta.state_shape(_EXAMPLE_BATCH)) for _ in meta.state_inputs)
    dynamic_axes = {s.name: {i: d for i, d in enumerate(s.shape) if d in (DIM_BATCH, DIM_SEQ)}
                    for s in want_in + want_out}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(graph, (tokens, *states), path, dynamo=False, opset_version=opset,
                          input_names=[s.name for s in want_in], output_names=[s.name for s in want_out],
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    for w in caught:  # deprecation + tracer notes; the shape check and the gate are the real guard
        log.debug("exporter warning: %s", str(w.message).splitlines()[0])
    proto = onnx.load(path)
    io = check_io(proto, meta)
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"rnnserve {cfg.arch} model exported from checkpoint {meta.checkpoint_sha256[:12]}"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    log.info("exported %s: %s", path, io)
    return proto


def _guarded(what: str, fn, *args, **kwargs):
    """Run fn; any unexpected exception becomes a one-line ExportError."""
    try:
        return fn(*args, **kwargs)
    except ExportError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"{what} failed: {type(e).__name__}: {first}") from e


def write_gated(out_dir: str, what: str, export_fn: Callable[[str], Any],
                gate_fn: Callable[[str], dict[str, Any]] | None) -> tuple[Any, dict[str, Any] | None, str | None]:
    """export_fn(path) writes the model to a temp file in out_dir; gate_fn(path) returns its parity report
    (None: no gate). Only a model that passes becomes out_dir/model.onnx, beside parity.json; a failing
    one leaves parity.failed.json and raises ExportError. Returns (export_fn's result, report, report path)."""
    os.makedirs(out_dir, exist_ok=True)
    final_path = os.path.join(out_dir, MODEL_FILENAME)
    tmp_path = os.path.join(out_dir, f".{MODEL_FILENAME}.tmp.{os.getpid()}")
    report, parity_path = None, None
    try:
        result = export_fn(tmp_path)
        if gate_fn is not None:
            report = gate_fn(tmp_path)
            if not report["pass"]:
                failed_path = os.path.join(out_dir, FAILED_PARITY_FILENAME)
                atomic_write_json(failed_path, report)
                raise ExportError(f"parity gate failed for {what}: {format_summary(report)}; "
                                  f"no {MODEL_FILENAME} written (report: {failed_path})")
            parity_path = os.path.join(out_dir, PARITY_FILENAME)
            atomic_write_json(parity_path, report)
        # Reports left by an earlier export into this folder no longer describe the model.
        for stale in (FAILED_PARITY_FILENAME, *(() if gate_fn else (PARITY_FILENAME,))):
            if os.path.exists(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
        os.replace(tmp_path, final_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return result, report, parity_path


def export_checkpoint(ckpt_path: str, out_dir: str, *, opset: int = DEFAULT_OPSET, gate: bool = True,
                      atol: float = ATOL, rtol: float = RTOL, threads: int | None = None) -> ExportResult:
    """Export a checkpoint to out_dir/model.onnx (+ parity.json). Raises CheckpointError or ExportError.

    On any failure no new model.onnx is written (an older one in out_dir is left as it was).
    """
    if is_forecast_checkpoint(read_checkpoint(ckpt_path)):
        from rnnserve.export.forecast_export import export_forecaster  # it builds on this module

        forecaster, ckpt = load_forecaster(ckpt_path)
        return export_forecaster(forecaster, ckpt, file_sha256(ckpt_path), out_dir, opset=opset, gate=gate,
                                 atol=atol, rtol=rtol, threads=threads)
    t0 = time.perf_counter()
    model, ckpt = load_checkpoint(ckpt_path)
    multichar = multichar_tokens(list(ckpt["vocab"]))
    if multichar:
        raise ExportError(f"{text_api_refusal(ckpt_path, multichar)}. rnnserve exports character models "
                          f"only: train on characters (rnnserve-train --task charlm)")
    info = {"vocab": ckpt["vocab"], "train_config": ckpt["train_config"],
            "checkpoint_sha256": file_sha256(ckpt_path)}
    train_seq_len = ckpt["train_config"].get("seq_len")
    if not isinstance(train_seq_len, int) or train_seq_len < 1:
        log.warning("%s: train_config has no seq_len; the gate uses %d", ckpt_path, DEFAULT_TRAIN_SEQ_LEN)
        train_seq_len = DEFAULT_TRAIN_SEQ_LEN
    os.makedirs(out_dir, exist_ok=True)
    gate_fn = (lambda path: _guarded(f"parity gate for {ckpt_path}", run_parity, model, path, atol=atol, rtol=rtol,
                                     train_seq_len=train_seq_len, threads=threads)) if gate else None
    proto, report, parity_path = write_gated(
        out_dir, ckpt_path, lambda path: _guarded(f"ONNX export of {ckpt_path}", export_model, model, info, path,
                                                  opset=opset), gate_fn)
    final_path = os.path.join(out_dir, MODEL_FILENAME)
    seconds = time.perf_counter() - t0
    log.info("export %s -> %s in %.1fs", ckpt_path, final_path, seconds)
    meta = parse_metadata({p.key: p.value for p in proto.metadata_props})
    return ExportResult(onnx_path=final_path, parity=report, seconds=seconds, parity_path=parity_path,
                        io=describe_io(*meta.io_spec()))
