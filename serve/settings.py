"""Server settings: one dataclass. serve/__main__.py fills it from flags and
RNNSERVE_* environment variables; tests build it directly. `problems()` lists
what is out of range (the server refuses to start on any)."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

from rnnserve import serving
from rnnserve.serve.eventloop import EVENT_LOOPS, uvloop_installed

log = logging.getLogger(__name__)
MODEL_CONTROL_MODES = ("none", "poll", "explicit")   # Triton's --model-control-mode names
DEFAULT_POLL_INTERVAL_S = 10.0                       # poll mode without --poll-interval
MiB = 2**20
GRPC_MAX_MESSAGE = 2**31 - 1                         # the largest message gRPC carries


@dataclass
class ServeSettings:
    repository: str
    host: str = "127.0.0.1"
    port: int = 8001                  # 0 = pick a free port
    device: str = "auto"              # auto | cpu | cuda
    intra_op_threads: int = 0         # onnxruntime threads per session (0 = chosen from the cores)
    lone_threads: int = 0             # threads of a run the model has to itself (0 = from the cores; 1 = off)
    wide_threads: int = 0             # threads of a wide run (0 = from the cores; <= intra_op_threads = off)
    inter_op_threads: int = 1
    max_seq_len: int = 65536          # longest seq accepted per request
    max_top_k: int = 100              # text API
    max_generate_tokens: int = 4096   # text API
    warmup: bool = True
    grace: float = 10.0               # seconds to drain in-flight calls on SIGTERM/SIGINT
    grpc_workers: int = 32            # threads for calls that wait in the data plane (text API, loads)
    event_loop: str = "auto"          # auto (uvloop when installed) | uvloop | asyncio
    max_streams: int = 16384          # open streams (ModelStreamInfer, TextService.Stream, Generate); 0 = no bound
    max_concurrent_calls: int = 4096  # unary calls in progress; past either bound: RESOURCE_EXHAUSTED
    handler_sched_batch: bool = True  # handler threads: SCHED_BATCH (no wake-up preemption; Linux)
    handler_nice: int = 0             # handler threads: this much nicer (Linux; 0 = as the process)
    max_message_bytes: int = 64 * MiB  # largest request accepted, after decompression
    max_response_bytes: int = 256 * MiB  # largest answer sent (also gRPC's send limit); larger: refused before the run
    max_run_bytes: int = 32 * MiB     # a stateful run estimated above this goes in time chunks (0 = never)
    server_name: str = "rnnserve"
    # batching and sequences
    max_batch_size: int = serving.MAX_BATCH_SIZE   # also the largest batch one request may carry
    instances: int = 0                # onnxruntime runs of one model in progress at once (0 = from the cores)
    max_queue_delay_us: int = serving.MAX_QUEUE_DELAY_US
    inline_run_us: int = 200          # a batch expected to run this quickly runs on the event loop (0 = never)
    max_queue_size: int = 1024
    max_sequences: int = 4096
    sequence_idle_timeout_s: float = serving.SEQUENCE_IDLE_US / 1e6
    state_store: str = "memory"       # memory | redis://HOST:PORT/DB (serve/engine/statestore.py)
    # repository changes and metrics
    model_control_mode: str = "none"  # none | poll | explicit
    poll_interval: float = 0.0        # seconds between scans in poll mode (0 = DEFAULT_POLL_INTERVAL_S)
    metrics_port: int = -1            # -1 = no metrics endpoint; 0 = a free port
    # security (README "Security")
    tls_cert: str = ""                # PEM certificate chain: TLS on the gRPC port and metrics
    tls_key: str = ""                 # its PEM private key
    tls_client_ca: str = ""           # PEM CA bundle that client certificates are checked against
    tls_require_client_cert: bool = False   # mTLS: refuse clients without a certificate
    token_file: str = ""              # lines "ROLE TOKEN"; RNNSERVE_TOKENS="ROLE:TOKEN,..." adds more
    tokens: str = ""                  # environment only (RNNSERVE_TOKENS): never a flag, never logged
    health_needs_token: bool = False  # grpc.health.v1 stays open for probes unless this is set
    reflection: bool | None = None    # None = on without tokens, off with them

    @property
    def lone_extra(self) -> bool:
        """Lone runs get a session of their own, whose threads spin while a run is in progress.
        That beats the shared session (which never spins) even with fewer threads than it has:
        on 16 cores, 2 spinning threads against the shared 4 (README "Lone runs")."""
        return self.lone_threads > 1

    @property
    def wide_extra(self) -> bool:
        """Wide runs (serve/engine/runkinds.py) get a session of their own with more threads than the
        shared one, which never spins either: a second thread nearly halves a run of many rows, and sleeps
        between runs so the front end keeps its core (README "Wide runs")."""
        return self.wide_threads > self.intra_op_threads

    @property
    def poll_seconds(self) -> float:
        """The scan interval in poll mode."""
        return self.poll_interval or DEFAULT_POLL_INTERVAL_S

    def problems(self) -> list[tuple[str, str]]:
        """What is out of range, as (field, what is wrong); [] when the server can start."""
        out = []
        for name in ("max_seq_len", "max_batch_size", "max_queue_size", "max_sequences",
                     "grpc_workers", "max_top_k", "max_generate_tokens", "max_message_bytes",
                     "max_response_bytes"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        for name in ("intra_op_threads", "lone_threads", "wide_threads", "inter_op_threads", "instances",
                     "max_queue_delay_us", "inline_run_us", "grace", "sequence_idle_timeout_s", "poll_interval",
                     "max_streams", "max_concurrent_calls", "max_run_bytes"):
            if getattr(self, name) < 0:
                out.append((name, f"must be >= 0, got {getattr(self, name)}"))
        for name in ("max_message_bytes", "max_response_bytes"):
            if getattr(self, name) > GRPC_MAX_MESSAGE:
                out.append((name, f"must be at most {GRPC_MAX_MESSAGE} (gRPC's limit), got {getattr(self, name)}"))
        if not 0 <= self.port <= 65535:
            out.append(("port", f"must be in 0..65535, got {self.port}"))
        if not -1 <= self.metrics_port <= 65535:
            out.append(("metrics_port", f"must be -1 (off) or in 0..65535, got {self.metrics_port}"))
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            out.append(("model_control_mode", f"must be one of {', '.join(MODEL_CONTROL_MODES)}, "
                                              f"got {self.model_control_mode!r}"))
        elif self.poll_interval > 0 and self.model_control_mode != "poll":
            out.append(("poll_interval", f"applies to the poll model control mode only, but the mode is "
                                         f"{self.model_control_mode!r} (--model-control-mode poll)"))
        if self.event_loop not in EVENT_LOOPS:
            out.append(("event_loop", f"must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}"))
        elif self.event_loop == "uvloop" and not uvloop_installed():
            out.append(("event_loop", "uvloop is not installed (pip install uvloop; auto falls back to asyncio)"))
        if bool(self.tls_cert) != bool(self.tls_key):
            out.append(("tls_key" if self.tls_cert else "tls_cert", "tls_cert and tls_key go together"))
        if (self.tls_client_ca or self.tls_require_client_cert) and not self.tls_cert:
            out.append(("tls_client_ca", "client certificates need TLS: give tls_cert and tls_key too"))
        elif bool(self.tls_client_ca) != self.tls_require_client_cert:
            out.append(("tls_require_client_cert", "and tls_client_ca go together (mTLS: the CA that signs the "
                                                   "client certificates, and refusing clients without one)"))
        return out

    def check(self) -> None:
        """Raise ValueError naming every setting that is out of range."""
        found = self.problems()
        if found:
            raise ValueError("; ".join(f"{name} {text}" for name, text in found))


class Threading(NamedTuple):
    """onnxruntime threading chosen for a machine (machine_threading)."""
    threads: int     # intra-op threads of the shared session
    instances: int   # runs of one model in progress at once
    lone: int        # threads of a lone run (1 = off)
    wide: int        # threads of a wide run (<= threads = off)


def machine_threading(cores: int) -> Threading:
    """The threading for a machine with `cores` CPUs. On small machines the front end (gRPC,
    conversion, batching: Python) needs a core of its own under load, and a second onnxruntime
    thread on every run only takes it away: one intra-op thread and one instance (measured on 2
    cores: bench_server / bench_batching, README). A wide run (serve/engine/runkinds.py: many rows
    over many steps, the load of many concurrent callers) is the exception: two threads nearly halve it,
    and its pool sleeps between runs (measured on 2 cores: bench_defaults, README "Wide runs").
    From 4 cores on, two runs in progress at once, each with half of the other half of the
    cores, and no wide runs (untested there). A lone run (the model has nothing else to do, and
    recent traffic came one request at a time) has the machine to itself, so it uses two
    threads, spinning while it runs (measured on 2 and 16 cores; more threads gain little on one
    recurrent row and are untested)."""
    lone = min(cores, 2)
    if cores < 4:
        return Threading(1, 1, lone, lone)
    return Threading(max(1, cores // 4), 2, lone, 1)


def machine_cores() -> int:
    """The cores this process may use (sched_getaffinity where there is one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def with_machine_defaults(settings: ServeSettings, cores: int | None = None) -> ServeSettings:
    """Fill the onnxruntime threading left at 0 from the core count (machine_cores), and log
    what was chosen."""
    if min(settings.intra_op_threads, settings.instances, settings.lone_threads, settings.wide_threads) > 0:
        return settings
    if cores is None:
        cores = machine_cores()
    machine = machine_threading(cores)
    chosen = dataclasses.replace(settings, intra_op_threads=settings.intra_op_threads or machine.threads,
                                 instances=settings.instances or machine.instances,
                                 lone_threads=settings.lone_threads or machine.lone,
                                 wide_threads=settings.wide_threads or machine.wide)
    log.info("onnxruntime threading for %d cores: %d intra-op threads per session%s, %d instances%s, "
             "spinning off; lone runs: %s%s; wide runs: %s%s", cores, chosen.intra_op_threads,
             "" if settings.intra_op_threads else " (chosen)", chosen.instances,
             "" if settings.instances else " (chosen)",
             f"{chosen.lone_threads} threads, spinning while they run" if chosen.lone_extra else "off",
             "" if settings.lone_threads else " (chosen)",
             f"{chosen.wide_threads} threads, not spinning" if chosen.wide_extra else "off",
             "" if settings.wide_threads else " (chosen)")
    return chosen
