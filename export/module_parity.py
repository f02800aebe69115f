"""The parity gate for any model described by a ModelSpec: the PyTorch module vs onnxruntime (CPU).

Cases: batch sizes {1, 3, 16} x seq lens (GATE_SEQ_LENS, plus whatever the caller adds) when an
input has a time axis; the inputs are the caller's examples with rows and steps drawn at random
(so ids and categories stay valid), and every state starts random. Every output and every final
state must agree elementwise within |d| <= atol + rtol*|ref| (export/tolerance.py); the output
named argmax_output (class scores) must also agree on the argmax, except near-ties.
Stateful models also run in onnxruntime in chunks (one step at a time, then uneven chunks),
carrying the states, and that must equal the whole run: every output with a time axis,
concatenated, and the final states.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.export.parity import BATCHES, case_totals, make_session
from rnnserve.export.tolerance import ATOL, RTOL, Tolerance, compare_outputs
from rnnserve.modelspec import ModelSpec

log = logging.getLogger(__name__)

GATE_SEQ_LENS = (1, 2, 7, 64, 1000)
STREAM_BATCH = 3
STREAM_SEQS = (17, 64)
STREAM_CHUNKS = (1, 5)   # chunk sizes: one step at a time, and uneven chunks of 5 (the last one shorter)


def take(a: np.ndarray, axis: int, idx: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.take(a, idx, axis=axis))


def _axes(spec: ModelSpec) -> dict[str, tuple[int | None, int | None]]:
    axes = {t.name: (t.batch_axis, t.time_axis) for t in spec.inputs + spec.outputs}
    axes.update({s.input: (s.batch_axis, None) for s in spec.states})
    axes.update({s.output: (s.batch_axis, None) for s in spec.states})
    return axes


def random_feeds(spec: ModelSpec, examples: dict[str, np.ndarray], rng: np.random.Generator, batch: int,
                 seq: int | None) -> dict[str, np.ndarray]:
    """Examples resampled to (batch, seq): random rows and steps; float states random normal."""
    axes, feeds = _axes(spec), {}
    state_in = {s.input for s in spec.states}
    for name, a in examples.items():
        b_ax, t_ax = axes[name]
        if name in state_in and np.issubdtype(a.dtype, np.floating):
            shape = [batch if i == b_ax else d for i, d in enumerate(a.shape)]
            feeds[name] = rng.standard_normal(shape).astype(a.dtype)
            continue
        if b_ax is not None:
            a = take(a, b_ax, rng.integers(0, a.shape[b_ax], batch))
        if seq is not None and t_ax is not None:
            a = take(a, t_ax, rng.integers(0, a.shape[t_ax], seq))
        feeds[name] = a
    return feeds


def _torch_run(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in out]


def _compare(names: Sequence[str], ref, got, tol: Tolerance, argmax_output: str | None) -> dict[str, Any]:
    """export/tolerance.py's comparison; argmax counts are 0 where no output is class scores."""
    return {"argmax_mismatches": 0, "argmax_near_ties": 0,
            **compare_outputs(list(names), list(ref), list(got), tol, argmax_output=argmax_output)}


def _case(fn, case: dict[str, Any]) -> dict[str, Any]:
    """A crash in either runtime is a failed case, reported, not raised."""
    try:
        case.update(fn())
    except Exception as e:
        case.update({"error": f"{type(e).__name__}: {e}", "max_abs_diff": None, "max_rel_diff": None,
                     "ratio": None, "argmax_mismatches": 0, "pass": False})
    return case


def _streamed(sess, spec: ModelSpec, feeds: dict[str, np.ndarray], outputs: Sequence[str], seq: int,
              chunk: int) -> list[np.ndarray]:
    """onnxruntime over the sequence in chunks, carrying the states; outputs in `outputs` order."""
    axes = _axes(spec)
    state = {s.input: feeds[s.input] for s in spec.states}
    pieces: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    for start in range(0, seq, chunk):
        idx = np.arange(start, min(start + chunk, seq))
        step = {n: (take(a, axes[n][1], idx) if axes[n][1] is not None else a) for n, a in feeds.items()}
        step.update(state)
        got = dict(zip(outputs, sess.run(list(outputs), step)))
        for n in outputs:
            pieces[n].append(got[n])
        state = {s.input: got[s.output] for s in spec.states}
    result = []
    for n in outputs:
        t_ax = axes[n][1]
        result.append(np.concatenate(pieces[n], axis=t_ax) if t_ax is not None else pieces[n][-1])
    return result


def run_module_parity(module: torch.nn.Module, onnx_path: str, spec: ModelSpec, examples: dict[str, np.ndarray],
                      input_order: Sequence[str], output_order: Sequence[str], *, atol: float = ATOL,
                      rtol: float = RTOL, seq_lens: Sequence[int] = GATE_SEQ_LENS, batches: Sequence[int] = BATCHES,
                      argmax_output: str | None = None, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """The gate's report (JSON-serialisable) with report["pass"]."""
    t0 = time.perf_counter()
    tol = Tolerance(atol, rtol)
    module.eval()
    sess = make_session(onnx_path, threads)
    rng = np.random.default_rng(seed)
    examples = {n: examples[n] for n in input_order}
    has_time = any(t.time_axis is not None for t in spec.inputs)
    seqs: list[int | None] = sorted(set(seq_lens)) if has_time else [None]

    def whole(batch: int, seq: int | None):
        feeds = random_feeds(spec, examples, rng, batch, seq)
        ref = _torch_run(module, feeds)
        got = sess.run(list(output_order), feeds)
        return _compare(output_order, ref, got, tol, argmax_output)

    cases = [_case(lambda b=b, s=s: whole(b, s), {"batch": b, "seq": s}) for b in batches for s in seqs]
    stepwise = []
    streamable = spec.streamable and has_time
    if streamable:
        # Outputs without a time axis (e.g. a summary of the last step) compare as the last chunk's value.
        def stream(seq: int, chunk: int):
            feeds = random_feeds(spec, examples, rng, STREAM_BATCH, seq)
            ref = sess.run(list(output_order), feeds)
            got = _streamed(sess, spec, feeds, output_order, seq, chunk)
            return _compare(output_order, ref, got, tol, argmax_output)

        stepwise = [_case(lambda s=s, c=c: stream(s, c), {"batch": STREAM_BATCH, "seq": s, "chunk": c})
                    for s in STREAM_SEQS for c in STREAM_CHUNKS]
    report = {
        **case_totals(cases, stepwise),
        "tolerance": {**tol.as_dict(), "argmax": f"identical for {argmax_output}, except near ties"},
        "batches": list(batches), "seq_lens": [s for s in seqs if s is not None],
        "cases": cases, "stepwise": stepwise,
        "stepwise_note": ("onnxruntime in chunks carrying the states vs the whole run" if streamable
                          else "skipped: no state pairs or no time axis"),
        "seed": seed, "ort_threads": sess.get_session_options().intra_op_num_threads,
        "onnxruntime_version": ort.__version__, "torch_version": torch.__version__,
    }
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report
