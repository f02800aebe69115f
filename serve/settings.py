"""Server settings: one dataclass. serve/__main__.py fills it from flags and
RNNSERVE_* environment variables; tests build it directly."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from rnnserve import serving

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    repository: str
    host: str = "127.0.0.1"
    port: int = 8001                  # 0 = pick a free port
    device: str = "auto"              # auto | cpu | cuda
    intra_op_threads: int = 0         # onnxruntime threads per session (0 = chosen from the cores)
    inter_op_threads: int = 1
    max_seq_len: int = 65536          # longest seq accepted per request
    max_top_k: int = 100              # text API
    max_generate_tokens: int = 4096   # text API
    warmup: bool = True
    grace: float = 10.0               # seconds to drain in-flight calls on SIGTERM/SIGINT
    grpc_workers: int = 32            # threads for calls that wait in the data plane (text API, loads)
    max_streams: int = 16384          # open streams (ModelStreamInfer, TextService.Stream, Generate); 0 = no bound
    max_concurrent_calls: int = 4096  # unary calls in progress; past either bound: RESOURCE_EXHAUSTED
    handler_sched_batch: bool = True  # handler threads: SCHED_BATCH (no wake-up preemption; Linux)
    handler_nice: int = 0             # handler threads: this much nicer (Linux; 0 = as the process)
    max_message_bytes: int = 2**31 - 1
    server_name: str = "rnnserve"
    # batching and sequences
    max_batch_size: int = serving.MAX_BATCH_SIZE
    instances: int = 0                # onnxruntime runs of one model in progress at once (0 = from the cores)
    max_queue_delay_us: int = serving.MAX_QUEUE_DELAY_US
    max_queue_size: int = 1024
    max_sequences: int = 4096
    sequence_idle_timeout_s: float = serving.SEQUENCE_IDLE_US / 1e6
    state_store: str = "memory"       # memory | redis://HOST:PORT/DB (serve/engine/statestore.py)
    # repository changes and metrics
    poll_interval: float = 0.0        # seconds; 0 = no polling
    metrics_port: int = -1            # -1 = no metrics endpoint; 0 = a free port


def machine_threading(cores: int) -> tuple[int, int]:
    """-> (intra-op threads, instances) for a machine with `cores` CPUs. On small machines the
    front end (gRPC, conversion, batching: Python) needs a core of its own, and a second
    onnxruntime thread only takes it away: one intra-op thread and one instance (measured on
    2 cores: bench_server / bench_batching, README). From 4 cores on, two runs in progress at
    once, each with half of the other half of the cores."""
    if cores < 4:
        return 1, 1
    return max(1, cores // 4), 2


def with_machine_defaults(settings: ServeSettings, cores: int | None = None) -> ServeSettings:
    """Fill the onnxruntime threading left at 0 from the core count (sched_getaffinity: the
    cores this process may use), and log what was chosen."""
    if settings.intra_op_threads > 0 and settings.instances > 0:
        return settings
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads, instances = machine_threading(cores)
    chosen = dataclasses.replace(settings, intra_op_threads=settings.intra_op_threads or threads,
                                 instances=settings.instances or instances)
    log.info("onnxruntime threading for %d cores: %d intra-op threads per session%s, %d instances%s, "
             "spinning off", cores, chosen.intra_op_threads, "" if settings.intra_op_threads else " (chosen)",
             chosen.instances, "" if settings.instances else " (chosen)")
    return chosen
