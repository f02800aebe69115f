"""`rnnserve-export CHECKPOINT --out DIR`: export one checkpoint to DIR/model.onnx behind the parity gate.
`rnnserve-export batch --checkpoints DIR_OR_GLOB --repository REPO [...]`: export every checkpoint
found into a versioned model repository (export/batch.py).

Subcommands are dispatched on argv[0]; a plain path is the single export.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

import torch

from rnnserve.cli import EXIT_INTERRUPTED, user_error
from rnnserve.export.batch import BatchOptions, discover, format_report, run_batch
from rnnserve.export.forecast_variant import DEFAULT_MAX_MAE_CHANGE
from rnnserve.export.int8 import DEFAULT_INT8, INT8_OPTIONS
from rnnserve.export.onnx_export import DEFAULT_OPSET, ExportError, export_checkpoint
from rnnserve.export.parity import ATOL, RTOL, format_cases, format_summary
from rnnserve.export.tritonconfig import DEFAULT_MAX_BATCH_SIZE
from rnnserve.export.variants import DEFAULT_MIN_AGREEMENT, VARIANTS
from rnnserve.train.checkpoint import CheckpointError

log = logging.getLogger(__name__)

SUBCOMMANDS = ("batch",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnserve-export",
                                description="Export an rnnserve checkpoint to ONNX and run the parity gate.")
    p.add_argument("checkpoint", help="checkpoint .pt written by `rnnserve-train`")
    p.add_argument("--out", required=True, help="output directory for model.onnx and parity.json")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    _tolerance_args(p)
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads for the gate (default: onnxruntime's)")
    p.add_argument("--no-gate", action="store_true", help="skip the parity gate (not for models you serve)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _nonnegative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _tolerance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=_nonnegative, default=ATOL,
                   help=f"parity gate: |d| <= atol + rtol*|ref| elementwise (default atol {ATOL:g})")
    p.add_argument("--rtol", type=_nonnegative, default=RTOL, help=f"parity gate rtol (default {RTOL:g})")


def _variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def _percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError("give a percentage, e.g. 99 or 99.5%")
    return value / 100.0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _batch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnserve-export batch",
                                description="Export every checkpoint found into REPO/<model>/<version>/ "
                                            "(parity gate, atomic publish, config.pbtxt, manifest.json).")
    p.add_argument("--checkpoints", required=True, action="append",
                   help="a directory (every **/checkpoint.pt under it), a checkpoint file, or a glob; repeatable")
    p.add_argument("--repository", required=True, help="model repository to publish into (created if missing)")
    p.add_argument("--keep", type=_positive, default=None,
                   help="keep only the newest N versions of each model (default: keep all)")
    p.add_argument("--variants", type=_variant_list, default=[],
                   help=f"comma-separated extra models per checkpoint: {','.join(VARIANTS)} "
                        f"(published as REPO/<model>-<variant>/; default: none)")
    p.add_argument("--name-from", choices=("dir", "file"), default="dir",
                   help="model name from the checkpoint's folder (default) or its file name")
    p.add_argument("--eval-text", default=None,
                   help="text file for the variants' top-1 agreement (default: the tail of the training "
                        "corpus named in the checkpoint, else random tokens)")
    p.add_argument("--min-agreement", type=_percent, default=DEFAULT_MIN_AGREEMENT,
                   help=f"refuse a variant below this top-1 agreement with fp32, in percent "
                        f"(default {DEFAULT_MIN_AGREEMENT * 100:g})")
    p.add_argument("--max-mae-change", type=_percent, default=DEFAULT_MAX_MAE_CHANGE,
                   help=f"refuse a regression forecaster's int8 variant whose test-split MAE is higher than "
                        f"fp32's by more than this, in percent of it (default {DEFAULT_MAX_MAE_CHANGE * 100:g})")
    p.add_argument("--int8", choices=list(INT8_OPTIONS), default=DEFAULT_INT8, metavar="OPTION",
                   help=f"how the int8 variant is quantized: {', '.join(INT8_OPTIONS)} "
                        f"(default {DEFAULT_INT8!r}; compared in bench/quant.py)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    _tolerance_args(p)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for onnxruntime (gate, variants, latency) and PyTorch (default: theirs)")
    p.add_argument("--max-batch-size", type=_positive, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"config.pbtxt max_batch_size for stateless (bidirectional) models "
                        f"(default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0, help="info logging (-vv: debug)")
    return p


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def batch_main(argv: list[str]) -> int:
    args = _batch_parser().parse_args(argv)
    _configure_logging(args.verbose)
    if args.threads:
        # The gate alternates PyTorch and onnxruntime; PyTorch's own pool on an oversubscribed
        # CPU makes its step-by-step RNN loops orders of magnitude slower, so cap it too.
        torch.set_num_threads(args.threads)
    opts = BatchOptions(checkpoints=args.checkpoints, repository=args.repository, keep=args.keep,
                        variants=args.variants, name_from=args.name_from, eval_text=args.eval_text,
                        min_agreement=args.min_agreement, max_mae_change=args.max_mae_change, int8=args.int8,
                        threads=args.threads, atol=args.atol, rtol=args.rtol,
                        opset=args.opset, max_batch_size=args.max_batch_size, progress=not args.no_progress)
    # SIGTERM (e.g. `docker stop`) stops like Ctrl-C: the staging folder is removed on the way out.
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))
    if not discover(args.checkpoints):
        return user_error(f"no checkpoint.pt found in {', '.join(args.checkpoints)}; give the folder "
                          f"rnnserve-train wrote into (e.g. runs/hello), a checkpoint file or a glob")
    try:
        outcome = run_batch(opts)
    except KeyboardInterrupt:  # a model is published whole or not at all, so the repository stays sound
        print("interrupted: the models published so far are complete; rerun to export the rest "
              "(unchanged checkpoints are skipped)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_report(outcome))
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:  # only "batch" so far
        return batch_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        res = export_checkpoint(args.checkpoint, args.out, opset=args.opset, gate=not args.no_gate,
                                atol=args.atol, rtol=args.rtol, threads=args.threads)
    except CheckpointError as e:
        return user_error(str(e))
    except ExportError as e:  # e.g. the parity gate failed: not the user's mistake
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"model:   {res.onnx_path}")
    print(f"shapes:  {res.io}  (declared shapes checked: batch, seq symbolic)")
    if res.parity is not None:
        print(f"parity:  {format_summary(res.parity)}  [{res.parity_path}]")
        print(format_cases(res.parity))
    else:
        print("parity:  SKIPPED (--no-gate)")
    print(f"seconds: {res.seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
