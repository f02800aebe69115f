"""rnnserve's client: the RnnClient class and the `rnnserve-client` CLI
(installed as `rnnserve-client`).

    rnnserve-client [--address HOST:PORT] [--json] health
    rnnserve-client models
    rnnserve-client metadata [MODEL]
    rnnserve-client predict MODEL TEXT [--top-k 3]
    rnnserve-client generate MODEL PROMPT [--max-tokens 100 --temperature 1 --seed 0 ...]
    rnnserve-client score MODEL TEXT
    rnnserve-client stream MODEL [CHUNK ...]   (no CHUNK: one chunk per stdin line)
    rnnserve-client infer MODEL --tokens 0,1,2;3,2,1 [--sequence-id ID --start --end --step N]
    rnnserve-client infer MODEL --features 48.1,0,305;47.9,1,305 [--sequence-id 7 --start]
    rnnserve-client infer MODEL --inputs inputs.json   ({"name": nested list, ...}; floats FP32, ints INT64)
    rnnserve-client forecast MODEL --data FILE.csv|vega:NAME [--rows 24 --warmup 48 --start-row ROW]

--address defaults to $RNNSERVE_ADDRESS, else 127.0.0.1:8001 (HOST:PORT, [IPv6]:PORT,
or a gRPC target with a scheme such as unix:/path or dns:///host:port). Output is
readable by default; --json prints one JSON object for scripts. A failed call prints
the gRPC status and exits 1; a bad flag exits 2; a closed output pipe (`| head`)
ends quietly with 141, as a process killed by SIGPIPE would.

Security (README "Security"): --tls-ca CA.pem speaks TLS and checks the server's
certificate against CA.pem (--tls without it: the system's CAs); --tls-cert/--tls-key
present a client certificate (mTLS). --token TOKEN (or --token-file FILE, or
$RNNSERVE_CLIENT_TOKEN) sends `authorization: Bearer TOKEN` with every call.
The TLS flags also read $RNNSERVE_CLIENT_TLS_CA / _CERT / _KEY.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.serve import client_forecast, client_tensors
from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc

DEFAULT_ADDRESS = "127.0.0.1:8001"
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, what shells report for a writer whose reader went away
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\([ntr\\])")
MAX_MESSAGE_BYTES = 2**31 - 1


def _dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class RnnClient:
    """A blocking client for both services. Calls raise grpc.RpcError on failure.

    TLS when any of tls / tls_ca / tls_cert is given: tls_ca (PEM file) is the CA the server's
    certificate must chain to (None = the system's CAs); tls_cert + tls_key (PEM files) are the
    client certificate for mTLS. token: sent as `authorization: Bearer <token>` on every call."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = None, *,
                 tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, token: str | None = None):
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if tls or tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca),
                                                       private_key=_read(tls_key),
                                                       certificate_chain=_read(tls_cert))
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._infer = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._text = tpb_grpc.TextServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def _opts(self) -> dict:
        return {"timeout": self.timeout, "metadata": self._metadata}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RnnClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    # -- health and metadata ---------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", ... ("" = the server)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                   **self._opts)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def live(self) -> bool:
        return self._infer.ServerLive(pb.ServerLiveRequest(), **self._opts).live

    def ready(self, model: str = "", version: str = "") -> bool:
        if model:
            return self._infer.ModelReady(pb.ModelReadyRequest(name=model, version=version),
                                          **self._opts).ready
        return self._infer.ServerReady(pb.ServerReadyRequest(), **self._opts).ready

    def models(self) -> list[dict]:
        """Every model version in the repository: name, version, state, reason."""
        reply = self._infer.RepositoryIndex(pb.RepositoryIndexRequest(), **self._opts)
        return [_dict(m) for m in reply.models]

    def metadata(self, model: str = "", version: str = "") -> dict:
        """The server's metadata, or a model's (name, versions, platform, inputs, outputs)."""
        if not model:
            return _dict(self._infer.ServerMetadata(pb.ServerMetadataRequest(),
                                                    **self._opts))
        return _dict(self._infer.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version),
                                               **self._opts))

    def config(self, model: str, version: str = "") -> dict:
        return _dict(self._infer.ModelConfig(pb.ModelConfigRequest(name=model, version=version),
                                             **self._opts).config)

    # -- text ------------------------------------------------------------------------------
    def predict(self, model: str, text: str, top_k: int = 3, version: str = "") -> dict:
        """{"decoded": "ohlol", "positions": [{index, input_char, char, prob, top: [...]}, ...]}"""
        return _dict(self._text.Predict(tpb.PredictRequest(model=model, version=version,
                                                           text=text, top_k=top_k),
                                        **self._opts))

    def generate(self, model: str, prompt: str, max_tokens: int = 100, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] = (), version: str = "") -> Iterator[dict]:
        """Yields {index, token_id, text, finish_reason} as the tokens stream in."""
        request = tpb.GenerateRequest(model=model, version=version, prompt=prompt,
                                      max_tokens=max_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p, stop=list(stop))
        if seed is not None:
            request.seed = seed
        for event in self._text.Generate(request, **self._opts):
            yield _dict(event)

    def score(self, model: str, text: str, version: str = "") -> dict:
        """{log_likelihood, nats_per_char, bits_per_char, num_predicted}"""
        return _dict(self._text.Score(tpb.ScoreRequest(model=model, version=version, text=text),
                                      **self._opts))

    def stream(self, model: str, chunks: Iterable[str], top_k: int = 3,
               version: str = "") -> Iterator[dict]:
        """TextService.Stream: yields one {chunk, decoded, positions: [...]} per chunk, in order,
        as they come back; the server keeps the state, so each chunk costs only its own
        characters. `chunks` is read lazily (a generator can feed it as text arrives)."""
        def requests():
            first = tpb.StreamRequest(model=model, version=version, top_k=top_k)
            for text in chunks:
                if first is not None:
                    first.text = text
                    yield first
                    first = None
                else:
                    yield tpb.StreamRequest(text=text)
            if first is not None:   # no chunks at all: just open (and close) the stream
                yield first

        for reply in self._text.Stream(requests(), **self._opts):
            yield _dict(reply)

    # -- tensors ---------------------------------------------------------------------------
    def infer(self, model: str, tokens: np.ndarray, h0: np.ndarray | None = None,
              c0: np.ndarray | None = None, version: str = "",
              outputs: list[str] | None = None, sequence_id: int | str = 0, start: bool = False,
              end: bool = False, step: int | None = None) -> dict[str, np.ndarray]:
        """tokens int64 [batch, seq] (+ optional h0/c0 float32) -> {"logits": ..., "hn": ...}.
        With sequence_id, one step of a server-side sequence (start / end: Triton's flags; step:
        the step's id, so that a retry is answered exactly once). It sends the `sequence-id`
        header, which a load balancer may hash on to keep a sequence on one replica."""
        inputs = {"tokens": np.asarray(tokens, dtype=np.int64)}
        for name, state in (("h0", h0), ("c0", c0)):
            if state is not None:
                inputs[name] = np.asarray(state, dtype=np.float32)
        return self.infer_tensors(model, inputs, version=version, outputs=outputs, sequence_id=sequence_id,
                                  start=start, end=end, step=step)

    def infer_tensors(self, model: str, inputs: dict[str, np.ndarray], version: str = "",
                      outputs: list[str] | None = None, sequence_id: int | str = 0, start: bool = False,
                      end: bool = False, step: int | None = None) -> dict[str, np.ndarray]:
        """Any model: named numpy inputs (float features, token ids, ...) -> named outputs; with
        sequence_id, one step of a server-side sequence, as for infer()."""
        params, metadata = sequence_parameters(sequence_id, start, end, step)
        request = convert.infer_request_to_proto(model, inputs, version=version, outputs=outputs,
                                                 parameters=params)
        return convert.infer_outputs_from_proto(self._infer.ModelInfer(
            request, timeout=self.timeout, metadata=[*(self._metadata or ()), *metadata]))


SEQUENCE_HEADER = "sequence-id"   # deploy/envoy.yaml hashes on it (locality; never needed for correctness)


def sequence_parameters(sequence_id: int | str = 0, start: bool = False, end: bool = False,
                        step: int | None = None) -> tuple[dict, list[tuple[str, str]]]:
    """(request parameters, call metadata) for one sequence step; ({}, []) outside a sequence."""
    if sequence_id in (0, ""):
        return {}, []
    params = {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end}
    if step is not None:
        params["sequence_step"] = step
    return params, [(SEQUENCE_HEADER, str(sequence_id))]


# ---- CLI ---------------------------------------------------------------------------------

def parse_address(text: str) -> str:
    """HOST:PORT with a port in 1..65535 (gRPC would dial 443 for a missing or empty port), or a target
    with a scheme (unix:..., dns:///..., ipv4:..., ipv6:...), passed as it is."""
    if ":" in text.split("/", 1)[0] and text.split(":", 1)[0] in ("unix", "unix-abstract", "dns", "ipv4", "ipv6",
                                                                   "vsock"):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or host == "[]" or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT with a port 1-65535 "
                                         f"(e.g. 127.0.0.1:8001 or [::1]:8001)")
    return text


def unescape(text: str) -> str:
    """--stop's escapes: \\n newline, \\t tab, \\r carriage return, \\\\ backslash; any other
    backslash stays as it is."""
    return _ESCAPE.sub(lambda m: ESCAPES[m.group(1)], text)


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _cmd_health(client: RnnClient, args) -> dict:
    status = client.health(args.service)
    result = {"service": args.service, "status": status}
    if not args.json:
        print(f"{args.service or 'server'}: {status}")
    return result


def _cmd_models(client: RnnClient, args) -> dict:
    models = client.models()
    if not args.json:
        _print_table([["MODEL", "VERSION", "STATE", "REASON"]] +
                     [[m["name"], m["version"], m["state"], m["reason"]] for m in models])
    return {"models": models}


def _cmd_metadata(client: RnnClient, args) -> dict:
    meta = client.metadata(args.model, args.version)
    if not args.json:
        if not args.model:
            print(f"{meta['name']} {meta['version']}\nextensions: {', '.join(meta['extensions'])}")
        else:
            print(f"{meta['name']} versions {', '.join(meta['versions'])} ({meta['platform']})")
            for kind in ("inputs", "outputs"):
                for t in meta[kind]:
                    print(f"  {kind[:-1]:6} {t['name']:8} {t['datatype']:6} {t['shape']}")
    return meta


def _cmd_predict(client: RnnClient, args) -> dict:
    result = client.predict(args.model, args.text, args.top_k, args.version)
    if not args.json:
        print(result["decoded"])
        for p in result["positions"]:
            top = "  ".join(f"{c['char']!r}:{c['prob']:.3f}" for c in p["top"])
            print(f"  {p['index']:3} {p['input_char']!r} -> {p['char']!r} {p['prob']:.3f}   {top}")
    return result


def _cmd_generate(client: RnnClient, args) -> dict:
    events = []
    if not args.json:
        print(args.prompt, end="", flush=True)
    try:
        for event in client.generate(args.model, args.prompt, args.max_tokens, args.temperature,
                                     args.top_k, args.top_p, args.seed, tuple(args.stop),
                                     args.version):
            events.append(event)
            if not args.json:
                print(event["text"], end="", flush=True)
    except grpc.RpcError:
        if not args.json:
            print(flush=True)   # end the partial line, so the error starts on its own
        raise
    finish = events[-1]["finish_reason"] if events else ""
    if not args.json:
        print(f"\n[{len(events)} tokens, finish: {finish}]")
    return {"prompt": args.prompt, "text": "".join(e["text"] for e in events),
            "tokens": [e["token_id"] for e in events], "finish_reason": finish}


def _cmd_score(client: RnnClient, args) -> dict:
    result = client.score(args.model, args.text, args.version)
    if not args.json:
        print(f"log-likelihood {result['log_likelihood']:.4f} nats over "
              f"{result['num_predicted']} chars: {result['nats_per_char']:.4f} nats/char, "
              f"{result['bits_per_char']:.4f} bits/char")
    return result


def _stdin_chunks(keep_newlines: bool) -> Iterator[str]:
    for line in sys.stdin:
        text = line if keep_newlines else line.rstrip("\r\n")
        if text:
            yield text


def _cmd_stream(client: RnnClient, args) -> dict:
    chunks = args.chunks or _stdin_chunks(args.keep_newlines)
    replies = []
    for reply in client.stream(args.model, chunks, args.top_k, args.version):
        replies.append(reply)
        if not args.json:
            text = "".join(p["input_char"] for p in reply["positions"])
            print(f"{reply['chunk']:3} {text!r} -> {reply['decoded']!r}", flush=True)
    return {"model": args.model, "chunks": replies,
            "decoded": "".join(r["decoded"] for r in replies)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve-client", description="rnnserve client",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--address", type=parse_address,
                        default=os.environ.get("RNNSERVE_ADDRESS", DEFAULT_ADDRESS),
                        help="server HOST:PORT [env RNNSERVE_ADDRESS]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=None, help="per-call deadline, seconds (none: no deadline)")
    security = {   # flag: (environment variable, help)
        "--tls-ca": ("RNNSERVE_CLIENT_TLS_CA", "PEM CA file the server's certificate must chain to (implies TLS)"),
        "--tls-cert": ("RNNSERVE_CLIENT_TLS_CERT", "PEM client certificate, for servers that ask for one (mTLS)"),
        "--tls-key": ("RNNSERVE_CLIENT_TLS_KEY", "PEM private key of --tls-cert"),
        "--token": ("RNNSERVE_CLIENT_TOKEN", "bearer token sent with every call"),
        "--token-file": ("RNNSERVE_CLIENT_TOKEN_FILE", "file holding the bearer token"),
    }
    for flag, (env, help_text) in security.items():
        parser.add_argument(flag, default=os.environ.get(env) or None, help=f"{help_text} [env {env}]")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CAs (no --tls-ca)")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)   # the same flags after the subcommand
    common.add_argument("--address", type=parse_address, default=argparse.SUPPRESS,
                        help="server HOST:PORT (default: $RNNSERVE_ADDRESS, else 127.0.0.1:8001)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="per-call deadline, seconds (default: none)")
    for flag, (env, help_text) in security.items():
        common.add_argument(flag, default=argparse.SUPPRESS, help=f"{help_text} [env {env}]")
    common.add_argument("--tls", action="store_true", default=argparse.SUPPRESS,
                        help="TLS with the system's CAs (no --tls-ca)")

    def command(name, func, help_text, model=False):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        if model:
            p.add_argument("model", help="model name")
            p.add_argument("--version", default="", help="model version (default %(default)r: the newest)")
        return p

    command("health", _cmd_health, "grpc.health.v1 status").add_argument(
        "--service", default="", help="a model name (default %(default)r: the server)")
    command("models", _cmd_models, "list the repository's models")
    p = command("metadata", _cmd_metadata, "server or model metadata")
    p.add_argument("model", nargs="?", default="", help="a model (default %(default)r: the server's metadata)")
    p.add_argument("--version", default="", help="model version (default %(default)r: every version)")
    p = command("predict", _cmd_predict, "next-character predictions for TEXT", model=True)
    p.add_argument("text", help="input text")
    p.add_argument("--top-k", type=int, default=3, help="candidates shown per position")
    p = command("generate", _cmd_generate, "stream generated text", model=True)
    p.add_argument("prompt", help="text the generation continues")
    p.add_argument("--max-tokens", type=int, default=100, help="characters to generate at most")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (none: random)")
    p.add_argument("--stop", action="append", default=[], type=unescape,
                   help="stop after this string (repeatable); \\n, \\t, \\r and \\\\ are escapes")
    p = command("score", _cmd_score, "log-likelihood of TEXT", model=True)
    p.add_argument("text", help="the text to score (its first character is not predicted)")
    p = command("stream", _cmd_stream, "stream text chunks, state kept on the server",
                model=True)
    p.add_argument("chunks", nargs="*", help="text chunks (none: one per stdin line)")
    p.add_argument("--top-k", type=int, default=3, help="candidates shown per position")
    p.add_argument("--keep-newlines", action="store_true",
                   help="stdin lines keep their newline character")
    client_tensors.add_parser(command)
    client_forecast.add_parser(command)
    return parser


def _token(args, parser: argparse.ArgumentParser) -> str | None:
    if args.token or not args.token_file:
        return args.token
    try:
        with open(args.token_file, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        parser.error(f"cannot read --token-file {args.token_file}: {exc.strerror}")


def _client(args, parser: argparse.ArgumentParser) -> RnnClient:
    try:
        return RnnClient(args.address, timeout=args.timeout, tls=args.tls, tls_ca=args.tls_ca,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, token=_token(args, parser))
    except OSError as exc:
        parser.error(f"cannot read a TLS file: {exc.filename}: {exc.strerror}")


def _run(args, parser: argparse.ArgumentParser) -> int:
    with _client(args, parser) as client:
        try:
            result = args.func(client, args)
        except grpc.RpcError as err:
            error = {"code": err.code().name, "message": err.details()}
            if args.json:
                print(json.dumps({"error": error}))
            else:
                print(f"error: {error['code']}: {error['message']}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = _run(args, parser)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # The reader (e.g. `head`) is gone: say nothing, and keep Python's exit-time flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
