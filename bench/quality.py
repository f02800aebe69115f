"""Quality run: train the char-lstm, char-gru and char-rnn presets on tinyshakespeare with a
time budget each (default 10 minutes), one after the other, then evaluate each best checkpoint
over the whole validation split (windows of 256 chars, state reset per window, float32).

    python -m bench.quality [--budget 10] [--models char-lstm char-gru char-rnn] [--eval-only]

Prints one markdown table.  Outputs go to runs/quality/<model>/.  The training settings are the
charlm defaults (train/charlm.py); wall-clock budgets make the step counts depend on the load
of the machine.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from rnnserve.train.charlm import CHAR_PRESET_NAMES, TrainConfig, train_charlm
from rnnserve.train.checkpoint import load_checkpoint, read_checkpoint
from rnnserve.train.data import CharData
from rnnserve.train.evaluate import evaluate_windows, to_bits

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))


def evaluate_checkpoint(path: str, data: CharData, window: int) -> dict:
    model, ckpt = load_checkpoint(path)
    if ckpt["vocab"] != data.vocab:
        raise SystemExit(f"{path} was trained on another vocabulary")
    t = time.perf_counter()
    nats = evaluate_windows(model, data.val, window=window)
    tc, m = ckpt["train_config"], ckpt["metrics"]
    cfg = model.cfg
    last = os.path.join(os.path.dirname(path), "last.pt")
    total = read_checkpoint(last)["train_state"]["step"] if os.path.exists(last) else m["step"]
    return {"model": tc["model"], "shape": f"{cfg.arch} {cfg.num_layers}x{cfg.hidden_size}",
            "params": model.num_params(), "steps": total, "best_step": m["step"],
            "budget": tc.get("time_budget"),
            "tokens": total * tc["batch_size"] * tc["seq_len"], "nats": nats, "bits": to_bits(nats),
            "eval_s": time.perf_counter() - t}


def table(rows: list, n_val: int, window: int) -> str:
    out = [f"Validation split: {n_val} chars, windows of {window} chars, state reset per window.", "",
           "| model | shape | params | steps (best at) | train chars | budget (min) | val nats/char | "
           "val bits/char |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['shape']} | {r['params'] / 1e6:.2f}M | {r['steps']} ({r['best_step']}) | "
                   f"{r['tokens'] / 1e6:.1f}M | {r['budget']} | {r['nats']:.4f} | {r['bits']:.4f} |")
    return "\n".join(out)


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=Formatter)
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="UTF-8 text to train and evaluate on")
    p.add_argument("--budget", type=float, default=10.0, help="minutes of training per model")
    p.add_argument("--models", nargs="+", default=list(CHAR_PRESET_NAMES), choices=CHAR_PRESET_NAMES,
                   help="presets to train, one after the other")
    p.add_argument("--out", default=os.path.join("runs", "quality"), help="runs go to OUT/<model>/")
    p.add_argument("--window", type=int, default=256, help="evaluation window (state reset per window)")
    p.add_argument("--seed", type=int, default=1337, help="training seed")
    p.add_argument("--eval-only", action="store_true", help="evaluate the existing checkpoints only")
    p.add_argument("--progress", action="store_true", help="show the tqdm bar while training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    data = CharData.from_file(args.corpus)
    rows = []
    for name in args.models:
        out = os.path.join(args.out, name)
        if not args.eval_only:
            cfg = TrainConfig(corpus=args.corpus, out=out, model=name, time_budget=args.budget,
                              seed=args.seed, progress=args.progress)
            log.info("training %s for %.1f min (torch threads: %d)", name, args.budget,
                     torch.get_num_threads())
            train_charlm(cfg)
        rows.append(evaluate_checkpoint(os.path.join(out, "checkpoint.pt"), data, args.window))
        log.info("%s: %.4f nats/char", name, rows[-1]["nats"])
    print(table(rows, len(data.val), args.window))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
