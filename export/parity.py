"""The parity gate: the checkpoint's own PyTorch model vs onnxruntime (CPU).

Cases: batch sizes {1, 3, 16} x seq_lens {1, 2, 7, T, 4T, 1000} (T = the training
seq_len), random tokens and, for streamable models, random initial states.  Logits
and final states must agree within ATOL and the argmax must be identical.  Argmax
exception: a position where PyTorch's own top two logits are within ATOL of each
other is a tie that float rounding may break either way; such positions are counted
(`argmax_near_ties`) but do not fail the gate.
Streamable models also run one token at a time in onnxruntime, carrying hn/cn, and
that must equal the whole-sequence run.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.contract import INPUT_TOKENS, OUTPUT_LOGITS, ModelMeta, parse_metadata

log = logging.getLogger(__name__)

ATOL = 1e-4
BATCHES = (1, 3, 16)
FIXED_SEQ_LENS = (1, 2, 7, 1000)
STEPWISE_BATCH = 3
STEPWISE_EXTRA_SEQ = 64
DEFAULT_TRAIN_SEQ_LEN = 32  # only when a checkpoint's train_config lacks seq_len


def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def make_session(onnx_path: str, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    # No busy-waiting between runs: the gate alternates torch and onnxruntime on a shared CPU.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])


def gate_seq_lens(train_seq_len: int) -> list[int]:
    return sorted(set(FIXED_SEQ_LENS) | {train_seq_len, 4 * train_seq_len})


def _random_inputs(rng: np.random.Generator, meta: ModelMeta, batch: int, seq: int) -> dict[str, np.ndarray]:
    feeds = {INPUT_TOKENS: rng.integers(0, meta.vocab_size, size=(batch, seq), dtype=np.int64)}
    for name in meta.state_inputs:
        feeds[name] = rng.standard_normal(meta.state_shape(batch)).astype(np.float32)
    return feeds


def _torch_run(model: torch.nn.Module, meta: ModelMeta, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    state = tuple(torch.from_numpy(feeds[n]) for n in meta.state_inputs) or None
    with torch.no_grad():
        logits, new_state = model(torch.from_numpy(feeds[INPUT_TOKENS]), state)
    outs = [logits.numpy()]
    if meta.streamable:
        outs += [s.numpy() for s in new_state]
    return outs


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    if not np.isfinite(d):
        raise ValueError("non-finite difference (NaN or inf in an output)")
    return d


def _argmax_check(ref: np.ndarray, got: np.ndarray, atol: float) -> dict[str, int]:
    a_ref, a_got = ref.argmax(-1), got.argmax(-1)
    diff = a_ref != a_got
    if not diff.any():
        return {"argmax_mismatches": 0, "argmax_near_ties": 0}
    ref_at_ref = np.take_along_axis(ref, a_ref[..., None], -1)[..., 0]
    ref_at_got = np.take_along_axis(ref, a_got[..., None], -1)[..., 0]
    tie = diff & (np.abs(ref_at_ref - ref_at_got) <= atol)
    return {"argmax_mismatches": int((diff & ~tie).sum()), "argmax_near_ties": int(tie.sum())}


def _compare(names: Sequence[str], ref: list[np.ndarray], got: list[np.ndarray], atol: float) -> dict[str, Any]:
    diffs = {n: _max_abs(r, g) for n, r, g in zip(names, ref, got)}
    argmax = _argmax_check(ref[0], got[0], atol)
    return {"logits_max_abs_diff": diffs[names[0]],
            "state_max_abs_diff": {n: diffs[n] for n in names[1:]},
            "max_abs_diff": max(diffs.values()),
            **argmax,
            "pass": max(diffs.values()) <= atol and argmax["argmax_mismatches"] == 0}


def _crashed(case: dict[str, Any], e: Exception) -> dict[str, Any]:
    """A crash in either runtime is a failed case, reported, not raised."""
    case.update({"error": f"{type(e).__name__}: {e}", "max_abs_diff": None, "pass": False})
    return case


def _whole_case(model, sess, meta, rng, batch: int, seq: int, atol: float) -> dict[str, Any]:
    case: dict[str, Any] = {"batch": batch, "seq": seq}
    try:
        feeds = _random_inputs(rng, meta, batch, seq)
        t0 = time.perf_counter()
        ref = _torch_run(model, meta, feeds)
        t1 = time.perf_counter()
        got = sess.run([OUTPUT_LOGITS, *meta.state_outputs], feeds)
        case.update(torch_s=round(t1 - t0, 4), ort_s=round(time.perf_counter() - t1, 4))
        case.update(_compare([OUTPUT_LOGITS, *meta.state_outputs], ref, got, atol))
    except Exception as e:
        _crashed(case, e)
    return case


def _stepwise_case(sess, meta, rng, batch: int, seq: int, atol: float) -> dict[str, Any]:
    """One token at a time in onnxruntime, carrying the state, vs the whole-sequence run."""
    case: dict[str, Any] = {"batch": batch, "seq": seq}
    names = [OUTPUT_LOGITS, *meta.state_outputs]
    try:
        feeds = _random_inputs(rng, meta, batch, seq)
        t0 = time.perf_counter()
        whole = sess.run(names, feeds)
        state = {n: feeds[n] for n in meta.state_inputs}
        step_logits = []
        for t in range(seq):
            outs = sess.run(names, {INPUT_TOKENS: feeds[INPUT_TOKENS][:, t:t + 1], **state})
            step_logits.append(outs[0])
            state = dict(zip(meta.state_inputs, outs[1:]))
        case["ort_s"] = round(time.perf_counter() - t0, 4)
        stepped = [np.concatenate(step_logits, axis=1), *(state[n] for n in meta.state_inputs)]
        case.update(_compare(names, whole, stepped, atol))
    except Exception as e:
        _crashed(case, e)
    return case


def run_parity(model: torch.nn.Module, onnx_path: str, *, train_seq_len: int, atol: float = ATOL,
               batches: Sequence[int] = BATCHES, seq_lens: Sequence[int] | None = None,
               seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Run the gate; returns the report (JSON-serialisable) with report["pass"]."""
    t0 = time.perf_counter()
    model.eval()
    sess = make_session(onnx_path, threads)
    meta = parse_metadata(sess.get_modelmeta().custom_metadata_map)
    rng = np.random.default_rng(seed)
    seq_lens = sorted(set(seq_lens)) if seq_lens is not None else gate_seq_lens(train_seq_len)
    cases = [_whole_case(model, sess, meta, rng, b, s, atol) for b in batches for s in seq_lens]
    stepwise = []
    if meta.streamable:
        stepwise = [_stepwise_case(sess, meta, rng, STEPWISE_BATCH, s, atol)
                    for s in sorted({train_seq_len, STEPWISE_EXTRA_SEQ})]
    all_cases = cases + stepwise
    report = {
        "pass": all(c["pass"] for c in all_cases),
        # None where a case crashed (the report stays strict JSON: no Infinity).
        "max_abs_diff": None if any(c["max_abs_diff"] is None for c in all_cases)
        else max(c["max_abs_diff"] for c in all_cases),
        "thresholds": {"max_abs_diff": atol,
                       "argmax": "identical, except ties where the PyTorch top-2 logits are within atol"},
        "batches": list(batches), "seq_lens": list(seq_lens), "train_seq_len": train_seq_len,
        "cases": cases,
        "stepwise": stepwise,
        "stepwise_note": ("onnxruntime one token at a time carrying the state vs the whole-sequence run"
                          if meta.streamable else "skipped: bidirectional models do not stream"),
        "arch": meta.arch, "seed": seed, "ort_threads": sess.get_session_options().intra_op_num_threads,
        "onnxruntime_version": ort.__version__, "torch_version": torch.__version__,
    }
    report["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("parity %s: %s", onnx_path, format_summary(report))
    return report


def format_summary(report: dict[str, Any]) -> str:
    n, ns = len(report["cases"]), len(report["stepwise"])
    diff = report["max_abs_diff"]
    shown = "n/a (a case crashed)" if diff is None else format(diff, ".3g")
    head = (f"max abs diff {shown} over {n} cases + {ns} stepwise "
            f"(atol {report['thresholds']['max_abs_diff']:g}): {'PASS' if report['pass'] else 'FAIL'}")
    failed = [c for c in report["cases"] + report["stepwise"] if not c["pass"]]
    if failed:
        shown = ", ".join(f"b{c['batch']}xs{c['seq']}: " + (c.get("error") or
                          f"diff {c['max_abs_diff']:.3g}, {c['argmax_mismatches']} argmax mismatches")
                          for c in failed[:3])
        head += f"; {len(failed)} failing, e.g. {shown}"
    return head
