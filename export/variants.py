"""Derived models of a gated fp32 model.onnx: int8, ORT-optimized, fp16.

Each variant is published as its own model, REPO/<model>-<variant>/<version>/model.onnx,
with the same I/O contract and the fp32 model's metadata_props plus `rnnserve.variant`
(so parse_metadata and the server read it like any model). A variant is accepted only
if its top-1 (argmax) agreement with the fp32 model on real text is >= min_agreement
(a forecaster's int8 variant: its test-split MAE, export/forecast_variant.py).

Why 99% by default: in a char LM the argmax flips only where the fp32 top-2 logits are
nearly tied, so a sound int8/fp16 model flips well under 1% of positions on real text;
more than 1% means the numbers moved enough to change greedy generation about once per
line, which we do not want to ship silently. Random-weight models have nearly tied
logits everywhere and may be refused: that is the check working, not noise.

  int8       onnxruntime dynamic quantization with the options of export/int8.py (default
             DEFAULT_INT8: per-channel weights, the output layer and embedding kept float32,
             the best in bench/quant.py). LSTM becomes com.microsoft DynamicQuantizeLSTM
             (checked: an LSTM model whose LSTM nodes stay float32 is refused). ORT has no
             quantized GRU/RNN kernel; a model with nothing quantized is refused.
  optimized  ORT offline optimization at ORT_ENABLE_EXTENDED (fusions for the CPU EP),
             not ORT_ENABLE_ALL, whose layout transforms are tied to the exporting CPU.
             It must also pass the full parity gate against PyTorch (run_parity).
  fp16       float16 initializers and compute, with Cast nodes at the interface so tokens
             stay int64 and logits/states float32. Meant for CUDA; measured here on the CPU
             EP (where ORT computes ops lacking fp16 kernels in float32 via inserted casts).
             onnxruntime 1.32's CPU NchwcTransformer (part of ORT_ENABLE_ALL) segfaults on
             these graphs, so fp16 sessions here disable that one optimizer.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from rnnserve.contract import INPUT_TOKENS, MODEL_FILENAME, OUTPUT_LOGITS, ModelMeta, parse_metadata
from rnnserve.export.forecast_variant import DEFAULT_MAX_MAE_CHANGE, compare_forecast, value_pair
from rnnserve.export.int8 import DEFAULT_INT8, INT8_OPTIONS, Int8Options, build_int8, op_counts
from rnnserve.export.module import check_spec_io, graph_io
from rnnserve.export.onnx_export import PARITY_FILENAME, ExportError, check_io
from rnnserve.export.parity import default_threads, format_summary, make_session, run_parity
from rnnserve.export.tolerance import DEFAULT_TOLERANCE, Tolerance
from rnnserve.files import atomic_write_json as write_json
from rnnserve.train.data import VAL_FRACTION
from rnnserve.train.forecast_data import Series

log = logging.getLogger(__name__)

VARIANTS = ("int8", "optimized", "fp16")
KEY_VARIANT = "rnnserve.variant"
KEY_VARIANT_BASE = "rnnserve.variant_base"
DEFAULT_MIN_AGREEMENT = 0.99
EVAL_TOKENS = 16384  # +-0.06% (one sigma) on an agreement near 99.5%
EVAL_WINDOW = 128
MIN_EVAL_TOKENS = 64
VARIANT_REPORT = "variant.json"
FP16_DISABLED_OPTIMIZERS = ["NchwcTransformer"]
FP16_NOTE = ("fp16 models need onnxruntime's NchwcTransformer disabled on CPU (onnxruntime 1.32 crashes "
             "creating their session otherwise); rnnserve-server disables it for every model")


@dataclass
class EvalText:
    tokens: np.ndarray   # 1-D int64 ids
    source: str


@dataclass
class VariantResult:
    variant: str
    accepted: bool
    reason: str
    report: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None  # the full gate report (optimized only)


def load_eval_text(meta: ModelMeta, train_config: Mapping[str, Any], text_path: str | None = None,
                   max_tokens: int = EVAL_TOKENS) -> EvalText:
    """Token ids of real text: --eval-text, else the tail (validation split) of the training corpus.

    Characters outside the vocabulary are dropped. Without usable text (e.g. the hello
    task), seeded uniform random tokens are used and the source says so.
    """
    index = {t: i for i, t in enumerate(meta.vocab)} if all(len(t) == 1 for t in meta.vocab) else {}
    candidates = []
    if text_path:
        candidates.append(("eval-text", text_path, False))
    corpus = train_config.get("corpus")
    if isinstance(corpus, str) and os.path.isfile(corpus):
        candidates.append(("corpus validation split", corpus, True))
    for label, path, tail in candidates if index else []:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if tail:
            text = text[len(text) - int(len(text) * VAL_FRACTION):]
        ids = [index[c] for c in text if c in index][:max_tokens]
        if len(ids) >= MIN_EVAL_TOKENS:
            return EvalText(np.asarray(ids, dtype=np.int64), f"{label} {path} ({len(ids)} tokens)")
        log.warning("%s: only %d in-vocabulary tokens in %s; trying the next source", label, len(ids), path)
    rng = np.random.default_rng(0)
    return EvalText(rng.integers(0, meta.vocab_size, size=max_tokens, dtype=np.int64),
                    f"synthetic: {max_tokens} uniform random tokens (no text for this vocabulary)")


def percent_pair(value: float, threshold: float, min_digits: int = 3, max_digits: int = 9) -> tuple[str, str]:
    """value and threshold as percentages with the same number of decimals, enough that the
    strings compare the way the numbers do: 41 of 4096 positions differing shows as
    98.999% against 99.000%, never as 99.00% < 99.00%."""
    for digits in range(min_digits, max_digits + 1):
        a, b = f"{value:.{digits}%}", f"{threshold:.{digits}%}"
        if (a == b) == (value == threshold):
            break
    return a, b


def variant_session(path: str, variant: str = "", threads: int | None = None) -> ort.InferenceSession:
    if variant != "fp16":
        return make_session(path, threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=FP16_DISABLED_OPTIMIZERS)


def _zero_states(meta: ModelMeta, batch: int) -> dict[str, np.ndarray]:
    return {n: np.zeros(meta.state_shape(batch), dtype=np.float32) for n in meta.state_inputs}


def compare_on_text(ref: ort.InferenceSession, got: ort.InferenceSession, meta: ModelMeta,
                    text: EvalText, window: int = EVAL_WINDOW) -> dict[str, Any]:
    """Top-1 agreement and max |logit diff| of two sessions on the text, in windows from zero state."""
    ids = text.tokens
    window = min(window, len(ids))
    rows = ids[: (len(ids) // window) * window].reshape(-1, window)
    feeds = {INPUT_TOKENS: rows, **_zero_states(meta, rows.shape[0])}
    a = ref.run([OUTPUT_LOGITS], feeds)[0]
    b = got.run([OUTPUT_LOGITS], feeds)[0]
    agree = a.argmax(-1) == b.argmax(-1)
    return {"top1_agreement": float(agree.mean()), "positions": int(agree.size),
            "top1_disagreements": int((~agree).sum()),
            "max_logit_diff": float(np.max(np.abs(a.astype(np.float64) - b))),
            "eval_text": text.source, "window": window}


# -- builders: src (gated fp32 model.onnx) -> dst; return facts for the report -----------------
def _build_optimized(src: str, dst: str, work_dir: str, meta: ModelMeta) -> dict[str, Any]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = dst
    opts.intra_op_num_threads = 1
    ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    return {"ops": op_counts(onnx.load(dst)), "method": "onnxruntime offline, ORT_ENABLE_EXTENDED, CPU EP",
            "onnxruntime_version": ort.__version__}


def _f16_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """float32 -> float16 inside the graph; float32 graph inputs/outputs keep their type via Casts."""
    g = proto.graph
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    for init in g.initializer:
        if init.data_type == f32:
            init.CopyFrom(_f16_tensor(init))
    for node in g.node:
        for a in node.attribute:
            if a.name in ("value_float", "value_floats"):
                raise ExportError(f"fp16: {node.op_type} node {node.name!r} has a float attribute {a.name}")
            if node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and a.t.data_type == f32:
                a.t.CopyFrom(_f16_tensor(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == f32:
                a.i = f16
    inputs = {i.name for i in g.input if i.type.tensor_type.elem_type == f32}
    outputs = {o.name for o in g.output if o.type.tensor_type.elem_type == f32}
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in inputs or name in outputs:
                node.input[k] = f"{name}__fp16"
        for k, name in enumerate(node.output):
            if name in outputs:
                node.output[k] = f"{name}__fp16"
    head = [helper.make_node("Cast", [n], [f"{n}__fp16"], to=f16, name=f"{n}__to_fp16") for n in sorted(inputs)]
    tail = [helper.make_node("Cast", [f"{n}__fp16"], [n], to=f32, name=f"{n}__to_fp32") for n in sorted(outputs)]
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # float32 annotations of intermediates are stale; re-inferred below
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def _build_fp16(src: str, dst: str, work_dir: str, meta: ModelMeta) -> dict[str, Any]:
    proto = to_fp16(onnx.load(src))
    onnx.save(proto, dst)
    return {"ops": op_counts(proto), "method": "float16 initializers/compute, float32 Cast at the interface",
            "measured_on": "CPUExecutionProvider (target: CUDA)",
            "note": FP16_NOTE,
            "ort_disabled_optimizers": FP16_DISABLED_OPTIMIZERS}


_BUILDERS = {"optimized": _build_optimized, "fp16": _build_fp16}


def _finish_proto(path: str, base_props: Mapping[str, str], variant: str, base_ref: str) -> ModelMeta:
    """Copy the fp32 metadata (+ variant keys) onto the built file and check the I/O contract."""
    proto = onnx.load(path)
    props = {**base_props, KEY_VARIANT: variant, KEY_VARIANT_BASE: base_ref}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    meta = parse_metadata(props)
    if meta.is_char_model:
        check_io(proto, meta)
    else:
        spec = meta.spec
        check_spec_io(proto, *graph_io(spec, [t.name for t in spec.inputs] + spec.state_inputs,
                                       [t.name for t in spec.outputs] + spec.state_outputs))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return meta


def make_variant(variant: str, base_onnx: str, out_dir: str, work_dir: str, *, model, train_seq_len: int,
                 base_ref: str, text: EvalText | None, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                 threads: int | None = None, tol: Tolerance = DEFAULT_TOLERANCE,
                 int8: Int8Options = INT8_OPTIONS[DEFAULT_INT8], series: Series | None = None,
                 max_mae_change: float = DEFAULT_MAX_MAE_CHANGE) -> VariantResult:
    """Build `variant` of base_onnx into out_dir/model.onnx and measure it. Raises ExportError if it breaks.

    A forecaster (series = its data, export/forecast_variant.py) is int8 only and is measured on
    its test split instead of text."""
    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if series is not None and variant != "int8":
        raise ExportError(f"{variant} variants are built for char models only; forecasters get int8")
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    dst = os.path.join(out_dir, MODEL_FILENAME)
    base_props = {p.key: p.value for p in onnx.load(base_onnx, load_external_data=False).metadata_props}
    try:
        base_meta = parse_metadata(base_props)
        info = (build_int8(base_onnx, dst, work_dir, base_meta.arch, int8) if variant == "int8"
                else _BUILDERS[variant](base_onnx, dst, work_dir, base_meta))
        meta = _finish_proto(dst, base_props, variant, base_ref)
        ref, got = make_session(base_onnx, threads), variant_session(dst, variant, threads)
        cmp = compare_forecast(ref, got, meta, series) if series is not None else compare_on_text(ref, got, meta, text)
    except ExportError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"{variant} variant of {base_onnx} failed: {type(e).__name__}: {first}") from e
    refuse = info.pop("refuse", "")
    parity = None
    if variant == "optimized":
        parity = run_parity(model, dst, train_seq_len=train_seq_len, atol=tol.atol, rtol=tol.rtol,
                            threads=threads)
        info["parity_gate"] = format_summary(parity)
        if not parity["pass"] and not refuse:
            refuse = f"parity gate failed: {format_summary(parity)}"
    elif variant == "int8" and series is None:
        # The gate's cases measure it against PyTorch (random tokens and states); informational:
        # int8 is not expected to meet the tolerance, acceptance is the agreement on text.
        measured = run_parity(model, dst, train_seq_len=train_seq_len, atol=tol.atol, rtol=tol.rtol,
                              threads=threads)
        info["vs_pytorch"] = {"max_abs_diff": measured["max_abs_diff"],
                              "argmax_mismatches": sum(c.get("argmax_mismatches", 0) for c in measured["cases"]),
                              "cases": len(measured["cases"])}
    by_mae = cmp.get("criterion") == "test_mae"
    if not refuse and by_mae and cmp["test_mae_rel_change"] > max_mae_change:
        shown, limit = percent_pair(cmp["test_mae_rel_change"], max_mae_change)
        fp32, got_mae = value_pair(cmp["fp32_test_mae"], cmp["variant_test_mae"])
        refuse = f"test MAE +{shown} > limit +{limit} (fp32 {fp32}, {variant} {got_mae})"
    elif not refuse and not by_mae and cmp["top1_agreement"] < min_agreement:
        shown, limit = percent_pair(cmp["top1_agreement"], min_agreement)
        refuse = (f"top-1 agreement {shown} < threshold {limit} "
                  f"({cmp['top1_disagreements']} of {cmp['positions']} positions differ)")
    threshold = max_mae_change if by_mae else min_agreement
    report = {"variant": variant, "base": base_ref, "accepted": not refuse, "reason": refuse,
              "threshold": threshold, **cmp, **info, "seconds": round(time.perf_counter() - t0, 3)}
    write_json(os.path.join(out_dir, VARIANT_REPORT), report)
    if parity is not None:
        write_json(os.path.join(out_dir, PARITY_FILENAME), parity)
    log.info("%s of %s: %s%s", variant, base_ref,
             {k: v for k, v in cmp.items() if isinstance(v, float)}, f"; refused: {refuse}" if refuse else "")
    return VariantResult(variant, not refuse, refuse, report, parity)
