"""Malformed requests against a real server: no INTERNAL, no hang, the process alive, and exact
answers afterwards.

    python -m bench.fuzz [--requests 100000] [--seed 0] [--workers 8]      # repo root

It builds the bench model (bench/bench_server.py: charlm, a 2-layer LSTM, vocab 65), starts
`rnnserve-server` as a subprocess with small text limits, records reference answers, then
sends seeded random requests to every RPC: random bytes, truncated and bit-flipped bodies,
and well-formed messages with wrong names, datatypes, shapes (negative, huge, 65 dimensions),
byte counts, parameters, text arguments and stop lists. It prints the status codes seen and
fails (exit 1) on INTERNAL, UNKNOWN or DEADLINE_EXCEEDED (a hang), a dead server, or an
answer that differs afterwards. tests/serve/test_fuzz.py runs `fuzz` with 2,000 requests.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import text_service_pb2 as tpb

INFER = "/inference.GRPCInferenceService/"
TEXT = "/rnnserve.v1.TextService/"
UNARY = [INFER + m for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                             "ModelConfig", "ModelStatistics", "ModelInfer", "RepositoryIndex",
                             "RepositoryModelLoad", "RepositoryModelUnload")] + \
        [TEXT + "Predict", TEXT + "Score", "/grpc.health.v1.Health/Check"]
BAD_CODES = {"INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"}
CALL_TIMEOUT_S = 30.0
DIMS = [-1, 0, 1, 2, 3, 8, 64, 65, 2**31, 2**62, 2**63 - 1]
DATATYPES = list(convert.DATATYPES) + ["", "INT65", "int64", "FP8", "\u00e9"]


def _name(rng: random.Random, model: str) -> str:
    return rng.choice([model, model, model, "nope", "", "../" + model, "/etc", ".", "..", model + "/1",
                       "x" * rng.randint(1, 3000), "\u00e9\u4e2d\U0001f600", model + "\0", " " + model])


def _text(rng: random.Random, longest: int = 80) -> str:
    alphabet = "hello world ABC\n\u00e9\u4e2d\0"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def _infer(rng: random.Random, model: str, vocab: int) -> pb.ModelInferRequest:
    if rng.random() < 0.3:   # mostly well-formed tokens with a twist
        rows, seq = rng.randint(0, 40), rng.randint(0, 80)
        tokens = np.asarray([[rng.randint(-2, vocab + 1) for _ in range(seq)] for _ in range(rows)], np.int64)
        tokens = tokens.reshape(rows, seq)
        params = {}
        if rng.random() < 0.3:
            params["sequence_id"] = rng.choice([1, 2, 0, -1, "s", "", "x" * 300, True, 2.5])
            params["sequence_start"] = rng.choice([True, False, 1, "yes"])
        if rng.random() < 0.2:
            params[rng.choice(["priority", "timeout", "sequence_end"])] = rng.choice([-1, 0, 5, 2**62, "x", True])
        return convert.infer_request_to_proto(_name(rng, model), {"tokens": tokens},
                                              version=rng.choice(["", "", "1", "2", "x"]), parameters=params)
    msg = pb.ModelInferRequest(model_name=_name(rng, model), model_version=rng.choice(["", "1", "0", "-1"]))
    raw = rng.random() < 0.6
    for _ in range(rng.randint(0, 3)):
        datatype = rng.choice(DATATYPES)
        shape = [rng.choice(DIMS) for _ in range(rng.choice([0, 1, 2, 2, 3, 17, 65]))]
        tensor = msg.inputs.add(name=rng.choice(["tokens", "tokens", "h0", "c0", "x", "", "t" * 500]),
                                datatype=datatype, shape=shape)
        if raw:
            msg.raw_input_contents.append(bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 8, 16, 64]))))
        elif datatype in convert.CONTENTS_FIELD:
            values = getattr(tensor.contents, convert.CONTENTS_FIELD[datatype])
            for _ in range(rng.randint(0, 8)):
                if datatype == "BOOL":
                    values.append(rng.choice([True, False]))
                elif datatype.startswith("FP"):
                    values.append(rng.choice([0.5, float("nan"), -1e30]))
                else:
                    values.append(rng.choice([0, 1, 2, 255]))
    if raw and rng.random() < 0.2:
        msg.raw_input_contents.append(b"extra")
    for _ in range(rng.randint(0, 2)):
        msg.outputs.add(name=rng.choice(["logits", "hn", "cn", "x", "logits"]))
    return msg


def _generate(rng: random.Random, model: str) -> tpb.GenerateRequest:
    msg = tpb.GenerateRequest(model=_name(rng, model), prompt=_text(rng, 20),
                              max_tokens=rng.choice([0, 1, 3, 17, 2**32 - 1]),
                              top_k=rng.choice([0, 3, 1000, 2**32 - 1]),
                              stop=[_text(rng, 4) for _ in range(rng.choice([0, 1, 40]))])
    if rng.random() < 0.5:
        msg.temperature = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 0.7])
    if rng.random() < 0.5:
        msg.top_p = rng.choice([float("nan"), 0.0, 0.5, 1.0, 2.0])
    if rng.random() < 0.3:
        msg.seed = rng.choice([2**64 - 1, 0, 7])
    return msg


def _body(rng: random.Random, method: str, model: str, vocab: int) -> bytes:
    """A structured request for `method`, often broken on purpose."""
    name = method.rsplit("/", 1)[1]
    if name == "ModelInfer":
        msg = _infer(rng, model, vocab)
    elif name in ("Predict", "Score"):
        cls = tpb.PredictRequest if name == "Predict" else tpb.ScoreRequest
        msg = cls(model=_name(rng, model), text=_text(rng), version=rng.choice(["", "1", "9"]))
        if name == "Predict":
            msg.top_k = rng.choice([0, 1, 3, 101, 10**6, 2**32 - 1])
    elif name in ("RepositoryModelLoad", "RepositoryModelUnload"):
        cls = getattr(pb, name + "Request")
        msg = cls(model_name=_name(rng, model))
    elif name in ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"):
        msg = getattr(pb, name + "Request")(name=_name(rng, model), version=rng.choice(["", "1", "x" * 400]))
    else:
        return b""
    return msg.SerializeToString()


def _mangle(rng: random.Random, body: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.5 or not body:
        return body
    data = bytearray(body)
    if roll < 0.7:
        return bytes(data[:rng.randrange(len(data))])                      # truncated
    if roll < 0.9:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)            # bit rot
        return bytes(data)
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))  # noise


def cases(seed: int, model: str, vocab: int) -> Iterator[tuple[str, str, object]]:
    """Endless (kind, method, body or list of bodies), from `seed`."""
    rng = random.Random(seed)
    while True:
        roll = rng.random()
        if roll < 0.7:
            method = rng.choice(UNARY)
            yield "unary_unary", method, _mangle(rng, _body(rng, method, model, vocab))
        elif roll < 0.8:
            yield "unary_stream", TEXT + "Generate", _mangle(rng, _generate(rng, model).SerializeToString())
        elif roll < 0.9:
            bodies = [_mangle(rng, _infer(rng, model, vocab).SerializeToString()) for _ in range(rng.randint(1, 4))]
            yield "stream_stream", INFER + "ModelStreamInfer", bodies
        else:
            first = tpb.StreamRequest(model=_name(rng, model), top_k=rng.choice([0, 3, 500]), text=_text(rng, 10))
            bodies = [first.SerializeToString()] + [tpb.StreamRequest(text=_text(rng, 10)).SerializeToString()
                                                   for _ in range(rng.randint(0, 3))]
            yield "stream_stream", TEXT + "Stream", [_mangle(rng, b) for b in bodies]


def _send(channel: grpc.Channel, kind: str, method: str, body) -> tuple[str, list[str]]:
    """-> (status code name, in-stream error messages)."""
    call = getattr(channel, kind)(method)
    errors = []
    try:
        if kind == "unary_unary":
            call(body, timeout=CALL_TIMEOUT_S)
        elif kind == "unary_stream":
            for _ in call(body, timeout=CALL_TIMEOUT_S):
                pass
        else:
            for answer in call(iter(body), timeout=CALL_TIMEOUT_S):
                if method.endswith("ModelStreamInfer"):
                    message = pb.ModelStreamInferResponse.FromString(answer).error_message
                    if message:
                        errors.append(message)
    except grpc.RpcError as err:
        return err.code().name, errors
    return "OK", errors


def reference(channel: grpc.Channel, model: str, vocab: int, text: str) -> tuple[bytes, bytes]:
    """Answers that must stay the same: a ModelInfer and a Predict, serialized."""
    infer = channel.unary_unary(INFER + "ModelInfer")
    predict = channel.unary_unary(TEXT + "Predict")
    tokens = np.arange(24, dtype=np.int64).reshape(2, 12) % vocab
    a = infer(convert.infer_request_to_proto(model, {"tokens": tokens}).SerializeToString(), timeout=CALL_TIMEOUT_S)
    b = predict(tpb.PredictRequest(model=model, text=text, top_k=3).SerializeToString(), timeout=CALL_TIMEOUT_S)
    return a, b


def fuzz(address: str, requests: int, seed: int = 0, workers: int = 8, model: str = "emb-lstm",
         vocab: int = 4, text: str = "hello") -> collections.Counter:
    """Send `requests` cases; -> Counter of status codes (in-stream errors count as IN_STREAM_ERROR).
    Raises AssertionError on a bad code, an internal in-stream error or a changed answer."""
    counts: collections.Counter = collections.Counter()
    with grpc.insecure_channel(address) as channel:
        before = reference(channel, model, vocab, text)
        source = cases(seed, model, vocab)
        batch = [next(source) for _ in range(requests)]
        with ThreadPoolExecutor(workers) as pool:
            for (_, method, _), (code, errors) in zip(batch, pool.map(lambda c: _send(channel, *c), batch)):
                counts[code] += 1
                counts["IN_STREAM_ERROR"] += len(errors)
                assert code not in BAD_CODES, f"{method} -> {code}"
                assert not any("internal server error" in e for e in errors), (method, errors)
        assert reference(channel, model, vocab, text) == before, "answers changed after fuzzing"
    return counts


def main(argv=None) -> int:
    from bench.bench_server import MODEL, VOCAB, build_repository, start_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests to send (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent client threads (default %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(tmp)
        proc, address = start_server(repo, 1, Path(tmp) / "port", ["--max-generate-tokens", "32",
                                                                   "--max-seq-len", "256"])
        try:
            import time
            t0 = time.perf_counter()
            counts = fuzz(address, args.requests, args.seed, args.workers, MODEL, len(VOCAB), "HELLO WORLD")
            elapsed = time.perf_counter() - t0
            assert proc.poll() is None, "the server died"
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"{args.requests} requests, seed {args.seed}, {elapsed:.1f} s ({args.requests / elapsed:.0f}/s); "
          f"server exit status {proc.returncode}")
    print(f"{'status':<22}{'count':>8}")
    for code, n in counts.most_common():
        print(f"{code:<22}{n:>8}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
