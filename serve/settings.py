"""Server settings: one dataclass. serve/__main__.py fills it from flags and
RNNSERVE_* environment variables; tests build it directly."""
from __future__ import annotations

from dataclasses import dataclass

from rnnserve import serving


@dataclass
class ServeSettings:
    repository: str
    host: str = "127.0.0.1"
    port: int = 8001                  # 0 = pick a free port
    device: str = "auto"              # auto | cpu | cuda
    intra_op_threads: int = 0         # onnxruntime threads per session (0 = onnxruntime's default)
    inter_op_threads: int = 1
    max_seq_len: int = 65536          # longest seq accepted per request
    max_top_k: int = 100              # text API
    max_generate_tokens: int = 4096   # text API
    warmup: bool = True
    grace: float = 10.0               # seconds to drain in-flight calls on SIGTERM/SIGINT
    grpc_workers: int = 32            # gRPC handler threads
    handler_sched_batch: bool = True  # handler threads: SCHED_BATCH (no wake-up preemption; Linux)
    handler_nice: int = 0             # handler threads: this much nicer (Linux; 0 = as the process)
    max_message_bytes: int = 2**31 - 1
    server_name: str = "rnnserve"
    # batching and sequences
    max_batch_size: int = serving.MAX_BATCH_SIZE
    instances: int = serving.INSTANCES  # onnxruntime runs of one model that may be in progress at once
    max_queue_delay_us: int = serving.MAX_QUEUE_DELAY_US
    max_queue_size: int = 1024
    max_sequences: int = 4096
    sequence_idle_timeout_s: float = serving.SEQUENCE_IDLE_US / 1e6
    state_store: str = "memory"       # memory | redis://HOST:PORT/DB (serve/engine/statestore.py)
    # repository changes and metrics
    poll_interval: float = 0.0        # seconds; 0 = no polling
    metrics_port: int = -1            # -1 = no metrics endpoint; 0 = a free port
