"""int8 builds of a gated fp32 model.onnx: onnxruntime dynamic quantization, with named options.

quant_pre_process (shape inference + ORT basic optimization), then quantize_dynamic:
int8 weights, activations quantized at run time. What each knob does here:
  per_channel   one scale per output row of each weight (LSTM W/R: per gate unit)
                instead of one per tensor: a row of small weights keeps its resolution.
  reduce_range  7-bit weights; for CPUs without VNNI, where u8*s8 pairs can saturate.
  fp32 parts    nodes left float32 (quantize_dynamic's nodes_to_exclude), by role:
                head (the output MatMul/Gemm), embedding (a Gather on a weight),
                first_recurrent / last_recurrent (the first/last LSTM/GRU/RNN node).
LSTM becomes com.microsoft DynamicQuantizeLSTM. onnxruntime has no int8 GRU or RNN
kernel: for those only the head and the embedding can be quantized.
bench/quant.py measures every entry of INT8_OPTIONS; DEFAULT_INT8 is the best there.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import onnx

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
PARTS = ("head", "embedding", "first_recurrent", "last_recurrent")
_QUANT_OP_PREFIXES = ("DynamicQuantize", "QLinear", "QGemm", "QAttention")
_QUANT_OP_SUFFIXES = ("Integer",)


@dataclass(frozen=True)
class Int8Options:
    per_channel: bool = True
    reduce_range: bool = False
    fp32: tuple[str, ...] = ()   # parts kept float32, from PARTS

    def __post_init__(self) -> None:
        bad = [p for p in self.fp32 if p not in PARTS]
        if bad:
            raise ValueError(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")

    def describe(self) -> str:
        bits = ["per-channel" if self.per_channel else "per-tensor"]
        if self.reduce_range:
            bits.append("reduce_range")
        if self.fp32:
            bits.append("fp32 " + "+".join(self.fp32))
        return ", ".join(bits)


# Every option bench/quant.py compares; the names are what its table prints.
INT8_OPTIONS: dict[str, Int8Options] = {
    "per-tensor": Int8Options(per_channel=False),
    "per-tensor fp32-head": Int8Options(per_channel=False, fp32=("head", "embedding")),
    "per-channel": Int8Options(),
    "per-channel reduce-range": Int8Options(reduce_range=True),
    "per-channel fp32-head": Int8Options(fp32=("head", "embedding")),
    "per-channel fp32-head reduce-range": Int8Options(reduce_range=True, fp32=("head", "embedding")),
    "per-channel fp32-head fp32-first": Int8Options(fp32=("head", "embedding", "first_recurrent")),
    "per-channel fp32-head fp32-last": Int8Options(fp32=("head", "embedding", "last_recurrent")),
}
DEFAULT_INT8 = "per-channel fp32-head"


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def quantized_ops(counts: Mapping[str, int]) -> dict[str, int]:
    return {op: c for op, c in counts.items()
            if op.startswith(_QUANT_OP_PREFIXES) or op.endswith(_QUANT_OP_SUFFIXES)}


def part_nodes(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names by role, in graph order (the exporter writes layers first to last)."""
    weights = {i.name for i in proto.graph.initializer}
    nodes = proto.graph.node
    recurrent = [n.name for n in nodes if n.op_type in RECURRENT_OPS]
    return {"head": [n.name for n in nodes if n.op_type in ("MatMul", "Gemm")],
            "embedding": [n.name for n in nodes if n.op_type == "Gather" and n.input[0] in weights],
            "first_recurrent": recurrent[:1], "last_recurrent": recurrent[-1:]}


@contextmanager
def _root_logger_kept() -> Iterator[None]:
    """onnxruntime.quantization calls logging.basicConfig, which would leave a handler on the
    root logger of the process that quantizes (a CLI's, a test run's): put it back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def build_int8(src: str, dst: str, work_dir: str, arch: str, options: Int8Options) -> dict[str, Any]:
    """Quantize src into dst; returns the facts for the report ("refuse" when nothing useful was quantized)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process
    os.makedirs(work_dir, exist_ok=True)
    pre = os.path.join(work_dir, "int8.pre.onnx")
    with _root_logger_kept():
        quant_pre_process(src, pre)
        parts = part_nodes(onnx.load(pre))
        exclude = sorted({name for p in options.fp32 for name in parts[p]})
        quantize_dynamic(pre, dst, weight_type=QuantType.QInt8, per_channel=options.per_channel,
                         reduce_range=options.reduce_range, nodes_to_exclude=exclude)
    counts = op_counts(onnx.load(dst))
    quant = quantized_ops(counts)
    fp32_recurrent = {op: counts[op] for op in RECURRENT_OPS if op in counts}
    info = {"ops": counts, "quantized_ops": quant, "float32_recurrent_ops": fp32_recurrent,
            "options": options.describe(), "float32_nodes": exclude,
            "method": f"quant_pre_process + quantize_dynamic(weight_type=QInt8, per_channel={options.per_channel}, "
                      f"reduce_range={options.reduce_range}, nodes_to_exclude=<fp32 parts>)"}
    wanted_lstm = arch == "lstm" and not {"first_recurrent", "last_recurrent"} & set(options.fp32)
    if wanted_lstm and ("LSTM" in counts or "DynamicQuantizeLSTM" not in counts):
        info["refuse"] = "the LSTM was not quantized (no DynamicQuantizeLSTM)"
    elif not quant:
        info["refuse"] = (f"nothing was quantized ({', '.join(fp32_recurrent) or 'no'} recurrent op stays "
                          f"float32: onnxruntime has no int8 kernel for it, and the model has no MatMul "
                          f"left to quantize)")
    return info
