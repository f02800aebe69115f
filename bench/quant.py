"""int8 options side by side: top-1 agreement with fp32 on real text, and speed (not a test; prints one table).

    python -m bench.quant [--checkpoints CKPT ...] [--corpus FILE] [--tokens 16384] [--threads 1]

For each checkpoint (default: runs/charlm/{char-lstm,char-gru,char-rnn}/checkpoint.pt,
those that exist): export fp32 (no gate: the gate is not what is measured), build every
int8 option of export/int8.py, and measure
  agreement  top-1 (argmax) agreement with the fp32 model on the validation split of the
             checkpoint's corpus (--corpus when the checkpoint's is gone), windows of 128
             characters from zero state, exactly as the int8 variant's acceptance check;
  p50        one onnxruntime CPU run at batch 1 x seq 64, zero state, `--threads` intra-op
             threads; every model of a checkpoint is timed in the same interleaved rounds
             so that load on a shared machine falls on all of them alike. Wall time and the
             calling thread's CPU time are both shown: with one thread (the default) the CPU
             time is the run's own work, which a loaded machine does not inflate as it does
             the wall time, so the speed target is judged on it (on wall time otherwise).
Targets (issue 16): agreement >= 99.5% and >= 2.5x the fp32 speed.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from rnnserve.contract import INPUT_TOKENS, OUTPUT_LOGITS, ModelMeta, parse_metadata
from rnnserve.export.int8 import DEFAULT_INT8, INT8_OPTIONS, build_int8
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.parity import make_session
from rnnserve.export.variants import compare_on_text, load_eval_text, percent_pair
from rnnserve.train.checkpoint import load_checkpoint

TARGET_AGREEMENT = 0.995
TARGET_SPEEDUP = 2.5
PRESETS = ("char-lstm", "char-gru", "char-rnn")
BATCH, SEQ = 1, 64
_SHORT = {"DynamicQuantizeLSTM": "LSTM", "MatMulInteger": "MatMul (head)"}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quant", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=None,
                   help="checkpoint files (default: runs/charlm/<preset>/checkpoint.pt for the char presets)")
    p.add_argument("--corpus", default=None, help="text whose validation split is used when a checkpoint's "
                                                  "own corpus is not found")
    p.add_argument("--tokens", type=int, default=16384, help="characters of validation text (default 16384)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model per round (default 20)")
    p.add_argument("--options", default=",".join(INT8_OPTIONS), help="comma-separated int8 options")
    p.add_argument("--work", default="runs/bench-quant", help="folder for the built models")
    return p.parse_args(argv)


def _feeds(meta: ModelMeta) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {INPUT_TOKENS: rng.integers(0, meta.vocab_size, (BATCH, SEQ), dtype=np.int64),
            **{n: np.zeros(meta.state_shape(BATCH), np.float32) for n in meta.state_inputs}}


def p50_ms(sessions: dict[str, ort.InferenceSession], meta: ModelMeta, rounds: int,
           runs: int) -> dict[str, tuple[float, float]]:
    """key -> (p50 wall ms, p50 CPU ms of the calling thread). With one intra-op thread onnxruntime
    computes on the calling thread, so the CPU time is the work itself, whatever else the machine runs."""
    feeds = _feeds(meta)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sessions}
    for sess in sessions.values():
        for _ in range(5):
            sess.run([OUTPUT_LOGITS], feeds)
    for _ in range(rounds):
        for key, sess in sessions.items():
            for _ in range(runs):
                w0, c0 = time.perf_counter(), time.thread_time()
                sess.run([OUTPUT_LOGITS], feeds)
                times[key].append((time.perf_counter() - w0, time.thread_time() - c0))
    return {k: (1e3 * statistics.median(w for w, _ in v), 1e3 * statistics.median(c for _, c in v))
            for k, v in times.items()}


def _trained(ckpt: dict) -> str:
    m = ckpt.get("metrics", {})
    parts = [f"{k} {m[k]:.4g}" if isinstance(m[k], float) else f"{k} {m[k]}"
             for k in ("step", "val_full_nats", "elapsed_s") if k in m]
    return ", ".join(parts) or "no metrics"


def bench_checkpoint(path: str, args: argparse.Namespace, options: list[str]) -> list[list[str]]:
    model, ckpt = load_checkpoint(path)
    name = os.path.basename(os.path.dirname(path))
    work = os.path.join(args.work, name)
    fp32 = export_checkpoint(path, os.path.join(work, "fp32"), gate=False, threads=args.threads).onnx_path
    meta = parse_metadata(make_session(fp32, 1).get_modelmeta().custom_metadata_map)
    train_config = dict(ckpt["train_config"])
    if args.corpus and not os.path.isfile(str(train_config.get("corpus"))):
        train_config["corpus"] = args.corpus
    text = load_eval_text(meta, train_config, None, max_tokens=args.tokens)
    print(f"# {name}: {meta.arch} {meta.num_layers}x{meta.hidden_size}, {model.num_params():,} params; "
          f"checkpoint {path} ({_trained(ckpt)}); text: {text.source}", flush=True)
    paths, facts = {"fp32": fp32}, {}
    if meta.arch != "lstm":  # no int8 GRU/RNN kernel: keeping a recurrent layer float32 changes nothing
        options = [o for o in options if not {"first_recurrent", "last_recurrent"} & set(INT8_OPTIONS[o].fp32)]
    for opt in options:
        dst = os.path.join(work, opt.replace(" ", "_"), "model.onnx")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        facts[opt] = build_int8(fp32, dst, os.path.join(work, "tmp"), meta.arch, INT8_OPTIONS[opt])
        paths[opt] = dst
    sessions = {k: make_session(p, args.threads) for k, p in paths.items()}
    agree = {k: compare_on_text(sessions["fp32"], s, meta, text) for k, s in sessions.items() if k != "fp32"}
    lat = p50_ms(sessions, meta, args.rounds, args.runs)
    rows = []
    for key, path_ in paths.items():
        size = f"{os.path.getsize(path_) / (1 << 20):.2f}"
        (wall, cpu), (wall0, cpu0) = lat[key], lat["fp32"]
        timing = [f"{wall:.3f}", f"{cpu:.3f}", f"{wall0 / wall:.2f}x", f"{cpu0 / cpu:.2f}x"]
        if key == "fp32":
            rows.append([name, "fp32", "-", size, "-", "-", *timing, ""])
            continue
        a, f = agree[key], facts[key]
        shown = percent_pair(a["top1_agreement"], TARGET_AGREEMENT)[0]
        speed = cpu0 / cpu if args.threads == 1 else wall0 / wall
        ok = a["top1_agreement"] >= TARGET_AGREEMENT and speed >= TARGET_SPEEDUP and not f.get("refuse")
        quant = " + ".join(f"{c} {_SHORT.get(op, op)}" for op, c in f["quantized_ops"].items()
                           if op != "DynamicQuantizeLinear") or "none"
        rows.append([name, key + (" (default)" if key == DEFAULT_INT8 else ""), quant, size,
                     f"{shown} ({a['top1_disagreements']}/{a['positions']})", f"{a['max_logit_diff']:.3g}",
                     *timing, "yes" if ok else "no (refused: nothing quantized)" if f.get("refuse") else "no"])
    return rows


def _table(rows: list[list[str]]) -> str:
    head = ["model", "int8 option", "int8 nodes", "MiB", "top-1 agreement (differ/positions)",
            "max logit diff", "p50 wall ms", "p50 CPU ms", "speed-up wall", "speed-up CPU", "targets met"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.WARNING)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = [o for o in options if o not in INT8_OPTIONS]
    if unknown:
        print(f"unknown option(s) {unknown}; choose from {', '.join(INT8_OPTIONS)}", file=sys.stderr)
        return 2
    paths = args.checkpoints or [p for p in (f"runs/charlm/{n}/checkpoint.pt" for n in PRESETS) if os.path.isfile(p)]
    if not paths:
        print("no checkpoint: train one (README, 'int8 options') or pass --checkpoints", file=sys.stderr)
        return 2
    t0 = time.time()
    print(f"python -m bench.quant {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; onnxruntime {ort.__version__}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs; {args.threads} intra-op thread(s); "
          f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for p in paths:
        rows += bench_checkpoint(p, args, options)
    print(_table(rows))
    print(f"p50 of one run at batch {BATCH} x seq {SEQ}, {args.rounds} interleaved rounds x {args.runs} runs. "
          f"targets: top-1 agreement >= {TARGET_AGREEMENT:.3%} and speed-up >= {TARGET_SPEEDUP}x vs fp32 "
          f"({'CPU time' if args.threads == 1 else 'wall time'}); default int8 option: {DEFAULT_INT8!r}")
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
