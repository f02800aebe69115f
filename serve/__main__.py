"""rnnserve-server --repository DIR (or --model DIR/model.onnx) [--port 8001 --device auto|cpu|cuda ...]

Every ServeSettings field is a flag (--max-seq-len, --grace, ...) and an
environment variable with the prefix RNNSERVE_ (RNNSERVE_MAX_SEQ_LEN, ...);
a flag beats the environment, which beats the default. `--threads` is short
for --intra-op-threads.

When the server is ready it prints `rnnserve listening on HOST:PORT` and logs the
bound addresses at WARNING (gRPC, and the metrics URL when --metrics-port is on);
it writes the port to --port-file, if given, and the metrics port to
<port-file>.metrics. With no READY model it logs an ERROR, and --strict exits 1. SIGTERM or SIGINT drains: no new calls,
in-flight calls get --grace seconds, then the process exits 0. Further
signals during the drain are logged and change nothing. SIGHUP re-reads the TLS
certificate files. A flag or RNNSERVE_* value out of range: one line, exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from rnnserve.contract import MODEL_FILENAME
from rnnserve.files import atomic_write_text
from rnnserve.serve.engine.runkinds import LONE_MIN_STEPS, WIDE_MIN_ROWS
from rnnserve.serve.engine.runtime import DEVICES
from rnnserve.serve.engine.statestore import shared_store
from rnnserve.serve.errors import Unavailable
from rnnserve.serve.eventloop import EVENT_LOOPS
from rnnserve.serve.grpc_core import prepare_environment
from rnnserve.serve.memory import Trimmer
from rnnserve.serve.settings import (
    DEFAULT_POLL_INTERVAL_S,
    MODEL_CONTROL_MODES,
    ServeSettings,
    machine_cores,
    machine_threading,
)

logger = logging.getLogger(__name__)

ENV_PREFIX = "RNNSERVE_"
EXIT_CONFIG = 2   # a flag or RNNSERVE_* value is wrong (argparse's status for bad flags)
ALIASES = {"intra_op_threads": ["--threads"]}
CHOICES = {"device": DEVICES, "model_control_mode": MODEL_CONTROL_MODES, "event_loop": EVENT_LOOPS}
KINDS = {"reflection": bool}              # fields whose default (None) does not tell the type
ENV_ONLY = {"tokens"}                     # secrets: a command line is visible to every local user
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Left at 0, these take machine_threading's choice for the cores (serve/settings.py): field -> its name there.
MACHINE_CHOSEN = {"intra_op_threads": "threads", "instances": "instances", "lone_threads": "lone",
                  "wide_threads": "wide"}
HELP = {
    "repository": "model repository: DIR/<model>/<version>/model.onnx (or give --model)",
    "port": "0 = a free port (see --port-file)",
    "device": "cuda fails at start-up unless CUDA is really active; auto falls back to CPU",
    "intra_op_threads": "onnxruntime threads per session",
    "lone_threads": "onnxruntime threads of a lone run: one the model has to itself while recent requests came "
                    "one at a time (1 = off). Its session spins while it runs and stops spinning at the end",
    "wide_threads": f"onnxruntime threads of a wide run: at least {WIDE_MIN_ROWS} rows over at least "
                    f"{LONE_MIN_STEPS} steps (at most --threads = off). Its session never spins",
    "instances": "onnxruntime runs of one model in progress at once (Triton's instance count); each batch "
                 "runs on one, the scheduler forms the next batch meanwhile",
    "event_loop": "the event loop every gRPC call runs on: uvloop (libuv, in C: less CPU per streamed message), "
                  "asyncio (the standard library's), or auto: uvloop when it is installed",
    "grpc_workers": "threads for calls that wait inside the data plane (text API, model loads); "
                    "tensor requests and idle streams hold none",
    "max_streams": "open streams (ModelStreamInfer, TextService.Stream, Generate); past it a new stream "
                   "gets RESOURCE_EXHAUSTED (0 = no bound)",
    "max_concurrent_calls": "unary calls in progress; past it a new call gets RESOURCE_EXHAUSTED "
                            "(0 = no bound; health checks are not counted)",
    "handler_sched_batch": "Linux: the gRPC event loop thread and the call threads run SCHED_BATCH, so "
                           "waking up they do not preempt the onnxruntime run queued work waits for",
    "handler_nice": "Linux: the gRPC event loop thread and the call threads this many steps nicer (helps long "
                    "stateless runs, hurts per-message-bound streaming; see serve/frontend/priority.py)",
    "grace": "seconds in-flight calls get to finish on SIGTERM/SIGINT",
    "model_control_mode": "none: the repository is read at start only, RepositoryModelLoad/Unload are "
                          "refused; poll: re-scanned every --poll-interval; explicit: load/unload over gRPC",
    "poll_interval": f"seconds between repository scans in poll mode (0 = {DEFAULT_POLL_INTERVAL_S:g})",
    "metrics_port": "Prometheus /metrics on --host:PORT (-1 = off, 0 = a free port, written to "
                    "<--port-file>.metrics and logged)",
    "host": "address to listen on (0.0.0.0 = every interface)",
    "inter_op_threads": "onnxruntime inter-op threads per session",
    "max_seq_len": "longest token sequence accepted in one request",
    "max_top_k": "largest top_k the text API accepts",
    "max_generate_tokens": "most tokens one Generate call may ask for",
    "warmup": "run each model on a few shapes at load, so the first request is not slow",
    "max_message_bytes": "largest request accepted, compressed or not (its decompressed size counts)",
    "max_response_bytes": "largest answer sent, and gRPC's send limit: a request whose answer would be larger "
                          "gets INVALID_ARGUMENT before it runs",
    "max_run_bytes": "a stateful model's run estimated to hold more than this (rows x steps x its intermediates) "
                     "runs in time chunks carrying the state, exactly; 0 = never split",
    "server_name": "the name ServerMetadata reports",
    "max_batch_size": "most rows one onnxruntime run takes (dynamic batching; 1 = off), and one request may carry",
    "max_queue_delay_us": "longest a batch waits for more rows, and only when recent traffic says more are coming",
    "inline_run_us": "a batch that the model's recent runs say takes at most this many microseconds of "
                     "onnxruntime runs on the gRPC event loop itself, saving two thread hand-offs (streamed "
                     "steps); longer ones, and any with a shared state store, go to the batcher's threads "
                     "(0 = never)",
    "max_queue_size": "queued requests per model before new ones get UNAVAILABLE",
    "max_sequences": "live server-side sequences before a new START gets UNAVAILABLE",
    "sequence_idle_timeout_s": "seconds after which an idle sequence's state is freed",
    "state_store": "where sequence state lives: memory (this process) or redis://HOST:PORT/DB (Redis or "
                   "Valkey, shared by replicas: any replica serves any step; see the README)",
    "tls_cert": "PEM certificate chain: TLS on the gRPC port and the metrics endpoint "
                "(re-read on SIGHUP and when the file changes)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle that signs the client certificates (mTLS; with --tls-require-client-cert)",
    "tls_require_client_cert": "mTLS: refuse clients without a certificate from --tls-client-ca",
    "token_file": "bearer tokens, one 'ROLE TOKEN' per line (roles: infer, admin); "
                  "RNNSERVE_TOKENS='ROLE:TOKEN,...' adds more",
    "health_needs_token": "grpc.health.v1 needs a token too (default: open for probes)",
    "reflection": "gRPC server reflection (default: on without tokens, off with them)",
}


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (true/false, yes/no, on/off, 1/0)")


def _parse_number(kind: type):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: "
                                             f"{text!r}") from None
    return parse


def _parse_choice(choices: tuple[str, ...]):
    """Any case in, the canonical spelling out."""
    canonical = {c.lower(): c for c in choices}

    def parse(text: str) -> str:
        try:
            return canonical[text.strip().lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}") from None
    return parse


def _parser_for(name: str, kind: type):
    if name in CHOICES:
        return _parse_choice(CHOICES[name])
    if kind is bool:
        return _parse_bool
    return _parse_number(kind) if kind in (int, float) else kind


def _config_error(parser: argparse.ArgumentParser, message: str):
    parser.exit(EXIT_CONFIG, f"{parser.prog}: error: {message}\n")


def _from_env(parser, env: Mapping[str, str], name: str, parse):
    """RNNSERVE_<NAME> parsed exactly as its flag would be; one line and exit 2 when it is wrong."""
    text = env[_env_name(name)]
    try:
        return parse(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        _config_error(parser, f"{_env_name(name)}={text[:100]!r}: {exc}")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """One flag per ServeSettings field (but ENV_ONLY); each default comes from RNNSERVE_<FIELD>
    when set, checked as the flag's value would be."""
    parser = argparse.ArgumentParser(
        prog="rnnserve-server", description=__doc__.split("\n\n")[0],
        epilog=f"environment only: {_env_name('tokens')}='ROLE:TOKEN,...' (bearer tokens; roles infer, admin)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cores = machine_cores()
    machine = machine_threading(cores)
    for field in dataclasses.fields(ServeSettings):
        if field.name in ENV_ONLY:
            continue
        flag = "--" + field.name.replace("_", "-")
        env_name = _env_name(field.name)
        required = field.default is dataclasses.MISSING and field.name != "repository"  # or --model
        default: Any = None if field.default is dataclasses.MISSING else field.default
        kind = KINDS.get(field.name) or (type(default) if default is not None else str)
        parse = _parser_for(field.name, kind)
        if env_name in env:
            default = _from_env(parser, env, field.name, parse)
            required = False
        text = HELP.get(field.name, field.name.replace("_", " "))
        if field.name in MACHINE_CHOSEN:
            text += (f"; 0 = chosen from the cores and logged: "
                     f"{getattr(machine, MACHINE_CHOSEN[field.name])} here, on {cores} cores")
        kwargs: dict[str, Any] = dict(dest=field.name, default=default, required=required,
                                      help=f"{text} [env {env_name}]")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = parse
            if field.name in CHOICES:
                kwargs["metavar"] = "{" + ",".join(CHOICES[field.name]) + "}"
        parser.add_argument(flag, *ALIASES.get(field.name, []), **kwargs)
    parser.add_argument("--port-file", default=env.get(_env_name("port_file")),
                        help=f"write the bound port here once listening [env {_env_name('port_file')}]")
    parser.add_argument("--model", help="serve one exported model.onnx (or the folder holding it) as a "
                                        "one-model repository, instead of --repository")
    parser.add_argument("--model-name", help="the name --model serves under (default: its folder's name)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 at start-up when no model is READY (default: serve anyway, logging an ERROR)")
    level = _parse_choice(LOG_LEVELS)
    parser.add_argument("--log-level", type=level, metavar="{" + ",".join(LOG_LEVELS) + "}",
                        default=_from_env(parser, env, "log_level", level) if _env_name("log_level") in env
                        else "INFO", help=f"logging threshold, any case [env {_env_name('log_level')}]")
    return parser


def parse_settings(argv=None, env: Mapping[str, str] | None = None
                   ) -> tuple[ServeSettings, argparse.Namespace]:
    """-> (settings, the parsed flags). Exits 2 with one line per problem when a value is wrong."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if args.model and args.repository:
        parser.error("give --repository DIR or --model FILE, not both")
    if not args.model and not args.repository:
        parser.error("--repository DIR is required (or --model DIR/model.onnx for one exported model)")
    if args.model:
        args.repository = ""   # main() puts the one-model repository here
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings) if f.name not in ENV_ONLY}
    values.update({name: env.get(_env_name(name), "") for name in ENV_ONLY})
    settings = ServeSettings(**values)
    problems = settings.problems()
    if problems:
        _config_error(parser, "\n".join(
            f"--{name.replace('_', '-')} [env {_env_name(name)}] {text}" for name, text in problems))
    return settings, args


def _write_port_file(path: str, port: int) -> None:
    atomic_write_text(path, f"{port}\n")   # readers never see a half-written file


def one_model_repository(model: str, name: str | None, root: str) -> str:
    """ROOT/<name>/1/model.onnx, a link to the exported file, so one export is served as it is
    (a re-export to the same path is picked up with --model-control-mode poll)."""
    src = os.path.abspath(os.path.join(model, MODEL_FILENAME) if os.path.isdir(model) else model)
    if not os.path.isfile(src):
        raise ValueError(f"--model {model}: no such file (give the model.onnx that rnnserve-export wrote)")
    name = name or os.path.basename(os.path.dirname(src))
    if not name or name.startswith(".") or os.sep in name:
        raise ValueError(f"--model-name {name!r} is not a folder name")
    os.makedirs(os.path.join(root, name, "1"))
    os.symlink(src, os.path.join(root, name, "1", MODEL_FILENAME))
    return root


def _ready_models(server, settings: ServeSettings) -> int:
    """How many model versions are READY; none is an ERROR that says why."""
    entries = server.dataplane.admin.repository_index()
    ready = sum(e.state == "READY" for e in entries)
    if not ready:
        why = "; ".join(f"{e.name}/{e.version or '-'}: {e.reason}" for e in entries) or "no model folder"
        logger.error("no model is READY in %s (%s): every inference call will fail. The layout is "
                     "REPO/<model>/<version>/model.onnx (rnnserve-export batch writes it); to serve one "
                     "exported file, use --model DIR/model.onnx", settings.repository, why)
    return ready


def main(argv=None) -> int:
    settings, args = parse_settings(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    experiments = prepare_environment(os.environ)   # before grpc loads (serve/grpc_core.py)
    if experiments is not None:
        logger.info("gRPC core: GRPC_EXPERIMENTS=%r", experiments)
    with tempfile.TemporaryDirectory(prefix="rnnserve-model-") as tmp:
        if args.model:
            try:
                settings = dataclasses.replace(settings, repository=one_model_repository(
                    args.model, args.model_name, tmp))
            except ValueError as exc:
                logger.error("cannot start: %s", exc)
                return EXIT_CONFIG
        return _serve(settings, args)


def _serve(settings: ServeSettings, args: argparse.Namespace) -> int:
    # Imported here, not at the top: grpc reads GRPC_EXPERIMENTS when it loads, after main() set it.
    from rnnserve.serve.frontend.server import create_server

    try:
        store = shared_store(settings.state_store)
    except ValueError as exc:
        logger.error("cannot start: %s", exc)
        return 2
    if store.shared:
        try:
            store.ping()
            logger.info("sequence state store: %s", store.url)
        except Unavailable as exc:   # serve anyway: sequence steps answer UNAVAILABLE until it is back
            logger.warning("%s", exc)
    try:
        server, port = create_server(settings)
    except ValueError as exc:   # a configuration the flags could not check alone (a token file, ...)
        logger.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - start-up failure: say why, exit non-zero
        logger.error("cannot start: %s", exc)
        return 1
    if not _ready_models(server, settings) and args.strict:
        server.stop(0)
        return 1

    stop_requested = threading.Event()

    def on_signal(signum, _frame):
        if stop_requested.is_set():   # e.g. `timeout` signals the process and its group
            logger.info("%s: already draining (at most --grace seconds)", signal.Signals(signum).name)
            return
        logger.info("%s: draining", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: server.reload_certificates())
    # the process's memory back to the OS after large requests (serve/memory.py)
    trimmer = Trimmer(release=server.dataplane.repo.release_memory)
    server.start()
    if args.port_file:
        if server.metrics_port is not None:   # first: the gRPC port file says everything is up
            _write_port_file(args.port_file + ".metrics", server.metrics_port)
        _write_port_file(args.port_file, port)
    logger.info("%d models, providers: %s", len(server.dataplane.model_names()),
                ", ".join(server.dataplane.providers()))
    metrics = f", Prometheus metrics on http://{settings.host}:{server.metrics_port}/metrics" \
        if server.metrics_port is not None else ""
    logger.warning("listening on %s (gRPC)%s", server.address, metrics)
    print(f"rnnserve listening on {server.address}", flush=True)   # scripts wait for this line
    while not stop_requested.wait(1.0):
        pass
    server.stop(settings.grace)
    trimmer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
