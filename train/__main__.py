"""rnnserve-train --task hello --model <preset> [--out DIR]
rnnserve-train --task charlm --corpus FILE [--model char-lstm] [--out DIR] [...]
rnnserve-train --task forecast [--data FILE.csv|vega:NAME] [--target COL] [--features COL,...]
               [--time-column COL] [--horizon H] [--arch gru] [--time-budget MIN] [...]

The default output directory is runs/<task>/<model>/.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from rnnserve.cli import EXIT_INTERRUPTED, user_error
from rnnserve.train.charlm import CHAR_PRESET_NAMES, MODEL_OVERRIDES, TrainConfig, train_charlm
from rnnserve.train.checkpoint import CheckpointError
from rnnserve.train.data import CorpusError
from rnnserve.train.forecast_cli import add_forecast_args, run_forecast
from rnnserve.train.hello import DEFAULT_SEED, train_hello
from rnnserve.train.model import ARCHS, ENCODINGS, PRESET_NAMES
from rnnserve.train.stopping import TrainingInterrupted

log = logging.getLogger(__name__)


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig.__dataclass_fields__  # defaults live in one place: the dataclass
    p = argparse.ArgumentParser(prog="rnnserve-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("hello", "charlm", "forecast"), required=True,
                   help="hello: the lecture notes' hello -> ohlol presets; charlm: a character language model "
                        "on --corpus; forecast: a forecaster on a CSV time series (--data)")
    p.add_argument("--model", help=f"hello: one of {PRESET_NAMES} or all; charlm: one of {CHAR_PRESET_NAMES} "
                                   "(default char-lstm)")
    p.add_argument("--out", help="output directory (default runs/<task>/<model>/)")
    p.add_argument("--seed", type=int, help=f"random seed (hello: {DEFAULT_SEED}; "
                                            f"charlm: {d['seed'].default})")
    p.add_argument("--lr", type=float, help=f"learning rate (hello: 0.1; charlm: {d['lr'].default})")
    p.add_argument("--epochs", type=int, default=15, help="hello: epochs (default 15)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    c = p.add_argument_group("charlm")
    c.add_argument("--corpus", help="UTF-8 text file")
    c.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt (--max-steps stays a total; --time-budget is this run's time)")
    c.add_argument("--time-budget", type=float,
                   help="minutes of training; then evaluate and save (on --resume: minutes more; default none)")
    c.add_argument("--max-steps", type=int, help=f"step limit (default {d['max_steps'].default or 'none'}; "
                                                 "3000 when no time budget is given)")
    for name, typ, what in (
            ("seq_len", int, "characters per training window"),
            ("batch_size", int, "windows per step"),
            ("min_lr_ratio", float, "the cosine ends at lr times this"),
            ("weight_decay", float, "AdamW weight decay (weight matrices only)"),
            ("beta2", float, "AdamW beta2"),
            ("warmup", int, "steps of linear learning-rate warm-up"),
            ("grad_clip", float, "clip the gradient norm to this (0 = off)"),
            ("eval_interval", int, "steps between evaluations (each saves last.pt and maybe checkpoint.pt)"),
            ("eval_windows", int, "validation windows per periodic evaluation (the final one uses all)"),
            ("eval_window", int, "characters per validation window (state reset per window)"),
            ("log_interval", int, "steps between metrics.jsonl train lines")):
        c.add_argument("--" + name.replace("_", "-"), type=typ, default=d[name].default,
                       help=f"{what} (default {d[name].default})")
    c.add_argument("--threads", type=int, default=d["threads"].default,
                   help="torch threads; 0 (default): the faster of 1 and all cores, re-timed while "
                        "training (a shared CPU can make 2 threads slower than 1)")
    c.add_argument("--bf16", type=_bool, default=d["bf16"].default,
                   help="bfloat16 autocast for training (true/false, default %(default)s)")
    c.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")

    add_forecast_args(p.add_argument_group("forecast (also uses --arch, --hidden-size, --num-layers, --dropout, "
                                            "--seq-len, --batch-size, --max-steps, --time-budget, --lr, --seed, "
                                            "--weight-decay, --eval-interval)"))
    m = p.add_argument_group("model overrides (charlm default: the --model preset's value, 2x512, emb 64, "
                             "dropout 0.3; forecast: gru, hidden 64, 1 layer)")
    m.add_argument("--arch", choices=ARCHS, help="recurrent layer type")
    m.add_argument("--encoding", choices=ENCODINGS, help="how tokens enter the network")
    m.add_argument("--emb-size", type=int, help="embedding size (encoding embedding)")
    m.add_argument("--hidden-size", type=int, help="recurrent state size")
    m.add_argument("--num-layers", type=int, help="stacked recurrent layers")
    m.add_argument("--dropout", type=float, help="dropout between layers and before the head")
    m.add_argument("--bidirectional", type=_bool, help="true/false (default false; not streamable)")
    return p


def _run_hello(args, p: argparse.ArgumentParser) -> int:
    """One preset into --out (default runs/hello/<preset>), or `--model all`:
    every preset into <out>/<preset> (default runs/hello/<preset>)."""
    if args.model != "all" and args.model not in PRESET_NAMES:
        p.error(f"--task hello needs --model in {PRESET_NAMES} or 'all'")
    seed = DEFAULT_SEED if args.seed is None else args.seed
    lr = 0.1 if args.lr is None else args.lr
    if args.model == "all":
        jobs = [(m, os.path.join(args.out or os.path.join("runs", "hello"), m)) for m in PRESET_NAMES]
    else:
        jobs = [(args.model, args.out or os.path.join("runs", "hello", args.model))]
    for model, out in jobs:
        train_hello(model, out, epochs=args.epochs, lr=lr, seed=seed, verbose=True)
    return 0


def _run_charlm(args, p: argparse.ArgumentParser, argv: list[str]) -> int:
    if not args.corpus:
        p.error("--task charlm needs --corpus FILE")
    model = args.model or "char-lstm"
    if model not in CHAR_PRESET_NAMES:
        p.error(f"--task charlm needs --model in {CHAR_PRESET_NAMES}")
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES if getattr(args, k) is not None}
    fields = {f: getattr(args, f) for f in ("seq_len", "batch_size", "min_lr_ratio", "weight_decay", "beta2",
                                            "warmup", "grad_clip", "eval_interval", "eval_windows",
                                            "eval_window", "log_interval", "threads", "bf16")}
    if args.lr is not None:
        fields["lr"] = args.lr
    if args.seed is not None:
        fields["seed"] = args.seed
    try:
        cfg = TrainConfig(corpus=args.corpus, out=args.out or os.path.join("runs", "charlm", model),
                          model=model, model_overrides=overrides, max_steps=args.max_steps,
                          time_budget=args.time_budget, resume=args.resume,
                          progress=not args.no_progress, **fields)
    except ValueError as e:
        p.error(str(e))
    try:
        train_charlm(cfg)
    except (CorpusError, CheckpointError) as e:
        return user_error(str(e))
    except TrainingInterrupted as e:
        print(f"{e.signame}: stopped at step {e.step}; saved {os.path.join(cfg.out, 'last.pt')} and loss.png. "
              f"Resume with: {resume_command(argv, e)}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def resume_command(argv: list[str], stopped: TrainingInterrupted) -> str:
    """The same command with --resume, and --time-budget set to what was left of the budget."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--resume",) or a.startswith("--time-budget="):
            pass
        elif a == "--time-budget":
            skip = True
        else:
            rest.append(a)
    rest.append("--resume")
    if stopped.budget_s:
        rest += ["--time-budget", f"{max(stopped.budget_s - stopped.elapsed_s, 0.0) / 60.0:.2f}"]
    return shlex.join(["rnnserve-train", *rest])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.task == "hello":
            return _run_hello(args, p)
        if args.task == "forecast":
            return run_forecast(args, p)
        return _run_charlm(args, p, argv)
    except KeyboardInterrupt:  # a second Ctrl-C, or one during the hello task
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
