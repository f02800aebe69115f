"""`python -m export CHECKPOINT --out DIR`: export one checkpoint to DIR/model.onnx behind the parity gate.

Subcommands are dispatched on argv[0] (issue 5 adds `batch`); a plain path is the single export.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from train.checkpoint import CheckpointError

from .onnx_export import DEFAULT_OPSET, ExportError, export_checkpoint
from .parity import ATOL, format_summary

log = logging.getLogger(__name__)

SUBCOMMANDS = ("batch",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export",
                                description="Export an rnnserve checkpoint to ONNX and run the parity gate.")
    p.add_argument("checkpoint", help="checkpoint .pt written by `python -m train`")
    p.add_argument("--out", required=True, help="output directory for model.onnx and parity.json")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--atol", type=float, default=ATOL, help=f"parity gate max abs diff (default {ATOL:g})")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads for the gate")
    p.add_argument("--no-gate", action="store_true", help="skip the parity gate (not for models you serve)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        print(f"error: `python -m export {argv[0]}` is not implemented yet", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        res = export_checkpoint(args.checkpoint, args.out, opset=args.opset, gate=not args.no_gate,
                                atol=args.atol, threads=args.threads)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"model:   {res.onnx_path}")
    print(f"shapes:  {res.io}  (declared shapes checked: batch, seq symbolic)")
    if res.parity is not None:
        print(f"parity:  {format_summary(res.parity)}  [{res.parity_path}]")
    else:
        print("parity:  SKIPPED (--no-gate)")
    print(f"seconds: {res.seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
