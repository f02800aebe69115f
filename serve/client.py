"""The `rnnserve-client` CLI over RnnClient (serve/rnnclient.py, also importable from here).

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
from collections.abc import Iterator

import grpc

from rnnserve.serve import client_forecast, client_tensors
from rnnserve.serve.rnnclient import DEFAULT_ADDRESS, RnnClient

EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, what shells report for a writer whose reader went away
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\([ntr\\])")


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
