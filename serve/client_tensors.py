"""`rnnserve-client infer MODEL ...`: raw tensor inference for any model (Open Inference Protocol).

Inputs come from --tokens (int64 [batch, seq]), --features (float32 [1, steps, F]) or a JSON
file (--inputs: {name: nested list}, floats as FP32, ints as INT64); --sequence-id (with
--start / --end / --step) makes the request a step of a sequence on the server.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from rnnserve.cli import user_error
from rnnserve.serve.wire import convert


def parse_tokens(text: str) -> np.ndarray:
    """"0,1,2;3,2,1" -> int64 [[0,1,2],[3,2,1]] (rows split by ';')."""
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
        return np.array(rows, dtype=np.int64)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"tokens must look like 0,1,2;3,2,1: {exc}") from None


def parse_features(text: str) -> np.ndarray:
    """"1.5,2;3,4" -> float32 [1, 2 steps, 2 features] (steps split by ';')."""
    try:
        rows = [[float(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
        return np.array([rows], dtype=np.float32)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"features must look like 1.5,2;3,4: {exc}") from None


def load_inputs(path: str) -> dict[str, np.ndarray]:
    """A JSON object {name: nested list}: lists of floats become FP32, of ints INT64."""
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict) or not raw:
            raise ValueError("expected a JSON object {input name: nested list}")
        return {name: np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else np.int64)
                for name, v in raw.items()}
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"--inputs {path}: {exc}") from None


def cmd_infer(client, args) -> dict:
    inputs = dict(args.inputs or {})
    if args.tokens is not None:
        inputs["tokens"] = args.tokens
    if args.features is not None:
        inputs[args.features_name] = args.features
    if not inputs:
        raise SystemExit(user_error("infer needs --tokens, --features or --inputs"))
    seq_id = int(args.sequence_id) if args.sequence_id.isdigit() else args.sequence_id
    outputs = client.infer_tensors(args.model, inputs, version=args.version, outputs=args.output or None,
                                   sequence_id=seq_id, start=args.start, end=args.end, step=args.step)
    result = {name: {"datatype": convert.tensor_to_raw(a)[0], "shape": list(a.shape),
                     "data": a.tolist()} for name, a in outputs.items()}
    if not args.json:
        for name, array in outputs.items():
            print(f"{name}: {array.dtype} {list(array.shape)}")
        if "logits" in outputs:
            print(f"argmax ids: {outputs['logits'].argmax(-1).tolist()}")
    return result


def add_parser(command) -> None:
    p = command("infer", cmd_infer, "raw tensor inference (Open Inference Protocol)", model=True)
    p.add_argument("--tokens", type=parse_tokens, help="int64 tokens, e.g. 0,1,2;3,2,1 (rows = batch)")
    p.add_argument("--features", type=parse_features,
                   help="float32 frames [1, steps, F], e.g. 48.1,0,305;47.9,1,305 (';' between steps)")
    p.add_argument("--features-name", default="features", help="input name for --features (default %(default)s)")
    p.add_argument("--inputs", type=load_inputs, help="JSON file {input name: nested list}")
    p.add_argument("--output", action="append", default=[], help="output to return (repeatable)")
    p.add_argument("--sequence-id", default="", help="a step of this server-side sequence (number or string)")
    p.add_argument("--start", action="store_true", help="the sequence's first step")
    p.add_argument("--end", action="store_true", help="the sequence's last step")
    p.add_argument("--step", type=int, default=None, help="the step's id (a retry is answered exactly once)")
