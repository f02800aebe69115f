"""The parity gate: the checkpoint's own PyTorch model vs onnxruntime (CPU).

Cases: batch sizes {1, 3, 16} x seq_lens {1, 2, 7, T, 4T, 1000} (T = the training
seq_len), random tokens and, for streamable models, random initial states.  Every
output (logits and final states) must agree elementwise within the tolerance
|d| <= atol + rtol*|ref| (export/tolerance.py says why these defaults), and the argmax
of the logits must be identical, except at near ties (the PyTorch scores of the two
classes within the tolerance), which are counted (`argmax_near_ties`) but do not fail.
Streamable models also run one token at a time in onnxruntime, carrying hn/cn, and
that must equal the whole-sequence run within the same tolerance.
Each case reports max abs diff, max rel diff and the worst element (nearest its limit):
its reference value, its diff and their ratio to the limit.
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
from rnnserve.export.tolerance import ATOL, RTOL, Tolerance, compare_outputs

log = logging.getLogger(__name__)

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


def _compare(names: Sequence[str], ref: list[np.ndarray], got: list[np.ndarray], tol: Tolerance) -> dict[str, Any]:
    return compare_outputs(list(names), ref, got, tol, argmax_output=OUTPUT_LOGITS)


def _crashed(case: dict[str, Any], e: Exception) -> dict[str, Any]:
    """A crash in either runtime is a failed case, reported, not raised."""
    case.update({"error": f"{type(e).__name__}: {e}", "max_abs_diff": None, "max_rel_diff": None,
                 "ratio": None, "pass": False})
    return case


def _whole_case(model, sess, meta, rng, batch: int, seq: int, tol: Tolerance) -> dict[str, Any]:
    case: dict[str, Any] = {"batch": batch, "seq": seq}
    try:
        feeds = _random_inputs(rng, meta, batch, seq)
        t0 = time.perf_counter()
        ref = _torch_run(model, meta, feeds)
        t1 = time.perf_counter()
        got = sess.run([OUTPUT_LOGITS, *meta.state_outputs], feeds)
        case.update(torch_s=round(t1 - t0, 4), ort_s=round(time.perf_counter() - t1, 4))
        case.update(_compare([OUTPUT_LOGITS, *meta.state_outputs], ref, got, tol))
    except Exception as e:
        _crashed(case, e)
    return case


def _stepwise_case(sess, meta, rng, batch: int, seq: int, tol: Tolerance) -> dict[str, Any]:
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
        case.update(_compare(names, whole, stepped, tol))
    except Exception as e:
        _crashed(case, e)
    return case


def run_parity(model: torch.nn.Module, onnx_path: str, *, train_seq_len: int, atol: float = ATOL,
               rtol: float = RTOL, batches: Sequence[int] = BATCHES, seq_lens: Sequence[int] | None = None,
               seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Run the gate; returns the report (JSON-serialisable) with report["pass"]."""
    t0 = time.perf_counter()
    tol = Tolerance(atol, rtol)
    model.eval()
    sess = make_session(onnx_path, threads)
    meta = parse_metadata(sess.get_modelmeta().custom_metadata_map)
    rng = np.random.default_rng(seed)
    seq_lens = sorted(set(seq_lens)) if seq_lens is not None else gate_seq_lens(train_seq_len)
    cases = [_whole_case(model, sess, meta, rng, b, s, tol) for b in batches for s in seq_lens]
    stepwise = []
    if meta.streamable:
        stepwise = [_stepwise_case(sess, meta, rng, STEPWISE_BATCH, s, tol)
                    for s in sorted({train_seq_len, STEPWISE_EXTRA_SEQ})]
    report = {
        **case_totals(cases, stepwise),
        "tolerance": {**tol.as_dict(),
                      "argmax": "identical, except near ties: the PyTorch scores of the two classes within "
                                "the tolerance"},
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


def case_totals(cases: list[dict[str, Any]], stepwise: list[dict[str, Any]]) -> dict[str, Any]:
    """A report's verdict and worst figures over its cases (any gate: this one, export/module_parity.py)."""
    all_cases = cases + stepwise
    crashed = any(c["max_abs_diff"] is None for c in all_cases)
    return {
        "pass": all(c["pass"] for c in all_cases),
        # None where a case crashed (the report stays strict JSON: no Infinity).
        "max_abs_diff": None if crashed else max(c["max_abs_diff"] for c in all_cases),
        "max_rel_diff": None if crashed else max(c["max_rel_diff"] for c in all_cases),
        "worst": None if crashed else _worst(cases, stepwise),
    }


def _worst(cases: list[dict[str, Any]], stepwise: list[dict[str, Any]]) -> dict[str, Any]:
    """The element nearest its limit over all cases (ratio = |d| / limit)."""
    tagged = [("whole", c) for c in cases] + [("stepwise", c) for c in stepwise]
    kind, c = max(tagged, key=lambda kc: float("inf") if kc[1]["ratio"] is None else kc[1]["ratio"])
    return {"case": f"{kind} b{c['batch']}xs{c['seq']}", "output": c["worst_output"], "ref": c["worst_ref"],
            "diff": c["worst_diff"], "ratio": c["ratio"]}


def _g(v: float | None) -> str:
    return "n/a" if v is None else format(v, ".3g")


def format_summary(report: dict[str, Any]) -> str:
    n, ns = len(report["cases"]), len(report["stepwise"])
    tol = Tolerance(report["tolerance"]["atol"], report["tolerance"]["rtol"])
    verdict = "PASS" if report["pass"] else "FAIL"
    if report["max_abs_diff"] is None:
        head = f"a case crashed, over {n} cases + {ns} stepwise ({tol.describe()}): {verdict}"
    else:
        w = report["worst"]
        head = (f"max abs diff {_g(report['max_abs_diff'])}, max rel diff {_g(report['max_rel_diff'])}; worst "
                f"element {w['output']} diff {_g(w['diff'])} at ref {_g(w['ref'])} ({_g(w['ratio'])} of its limit) "
                f"over {n} cases + {ns} stepwise ({tol.describe()}): {verdict}")
    failed = [c for c in report["cases"] + report["stepwise"] if not c["pass"]]
    if failed:
        shown = ", ".join(f"b{c['batch']}xs{c['seq']}: " + (c.get("error") or
                          f"diff {c['worst_diff']:.3g} at ref {c['worst_ref']:.3g}, "
                          f"{c['argmax_mismatches']} argmax mismatches")
                          for c in failed[:3])
        head += f"; {len(failed)} failing, e.g. {shown}"
    return head


def format_cases(report: dict[str, Any]) -> str:
    """One line per case: max abs diff, max rel diff, the worst element (output, ref, diff, ratio to limit)."""
    rows = [("case", "max abs diff", "max rel diff", "worst output", "worst ref", "worst diff", "of limit", "")]
    for kind, cases in (("whole", report["cases"]), ("stepwise", report["stepwise"])):
        for c in cases:
            rows.append((f"{kind} b{c['batch']}xs{c['seq']}", _g(c["max_abs_diff"]), _g(c["max_rel_diff"]),
                         c.get("worst_output", "-"), _g(c.get("worst_ref")), _g(c.get("worst_diff")),
                         _g(c["ratio"]), "ok" if c["pass"] else c.get("error", "FAIL")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
