"""Prometheus metrics (prometheus-client), served over HTTP at /metrics with --metrics-port.

Every server has its own CollectorRegistry, so several servers live in one process.
Labels: `model` and `version` are the version a request went to (the newest READY one
when it named none); a request naming no model the repository knows counts under
model="" version="", one naming an unknown version of a known model under version="".
`method` is the RPC: ModelInfer, ModelStreamInfer (each streamed request), Predict,
Generate, Score, Stream (each call). `code` is the gRPC status name the client got
(OK, INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...), as the front end's request
observation (serve/frontend/observe.py) saw it. Every count comes from one record of
serve/stats.py, which feeds ModelStatistics at the same time.

| metric | type | labels | what |
|---|---|---|---|
| rnnserve_requests_total | counter | model, version, method, code | inference requests by outcome |
| rnnserve_request_duration_seconds | histogram | model, version, method | each request, arrival to answer (1) |
| rnnserve_inferences_total | counter | model, version | rows run (2) |
| rnnserve_executions_total | counter | model, version | onnxruntime runs; inferences / executions = mean batch |
| rnnserve_batch_size | histogram | model, version | rows per onnxruntime run |
| rnnserve_queue_duration_seconds | histogram | model, version | each work item's wait in the batcher's queue |
| rnnserve_compute_duration_seconds | histogram | model, version | each onnxruntime run (one batch) |
| rnnserve_live_sequences | gauge | model, version | live server-side sequences plus open text streams |
| rnnserve_queue_depth | gauge | model, version | work items waiting in the batcher's queue |
| rnnserve_model_state | gauge | model, version, state | 1 for the version's state (3), 0 for the others |

(1) every outcome; a Generate call to its last token. (2) a tensor request's batch rows, one
per text request run, one per generate step. (3) READY, LOADING, UNAVAILABLE or UNLOADED.

Warm-up runs are not counted. The series of a version removed from the repository stay
(counters never go backwards); its gauges disappear.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

STATES = ("READY", "LOADING", "UNAVAILABLE", "UNLOADED")
# Char models answer in well under a millisecond; a long Generate call takes seconds.
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL_LABELS = ("model", "version")

class Metrics:
    """The metrics of one server. `watch(repository)` adds the gauges read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("rnnserve_requests", "Inference requests by gRPC status code",
                                MODEL_LABELS + ("method", "code"), registry=reg)
        self.request_seconds = Histogram("rnnserve_request_duration_seconds",
                                         "Inference request latency, arrival to answer",
                                         MODEL_LABELS + ("method",), buckets=SECONDS_BUCKETS, registry=reg)
        self.inferences = Counter("rnnserve_inferences", "Rows run (batch rows of requests, text runs, "
                                  "generate steps)", MODEL_LABELS, registry=reg)
        self.executions = Counter("rnnserve_executions", "onnxruntime runs", MODEL_LABELS, registry=reg)
        self.batch_size = Histogram("rnnserve_batch_size", "Rows per onnxruntime run", MODEL_LABELS,
                                    buckets=BATCH_BUCKETS, registry=reg)
        self.queue_seconds = Histogram("rnnserve_queue_duration_seconds",
                                       "Time each work item waited in the batcher's queue", MODEL_LABELS,
                                       buckets=SECONDS_BUCKETS, registry=reg)
        self.compute_seconds = Histogram("rnnserve_compute_duration_seconds", "Time of each onnxruntime run",
                                         MODEL_LABELS, buckets=SECONDS_BUCKETS, registry=reg)

    def watch(self, repository) -> None:
        """Read model states, live sequences and queue depth from a serve.admin.repository.Repository."""
        self.registry.register(_RepositoryCollector(repository))

    def model(self, model: str, version: str) -> ModelMetrics:
        """The per-run series of one model version (fed by its serve.stats.ModelCounters)."""
        return ModelMetrics(self, model, version)

    def observe_request(self, method: str, model: str, version: str, code: str, seconds: float) -> None:
        """One inference request's outcome, labelled by the version it went to (DataPlane.record_request)."""
        self.requests.labels(model, version, method, code).inc()
        self.request_seconds.labels(model, version, method).observe(seconds)


class ModelMetrics:
    """The per-run series of one model version, bound to its labels."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self._inferences = metrics.inferences.labels(model, version)
        self._executions = metrics.executions.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._queue = metrics.queue_seconds.labels(model, version)
        self._compute = metrics.compute_seconds.labels(model, version)

    def record_run(self, run) -> None:
        """One serve.stats.RunRecord."""
        self._inferences.inc(run.rows)
        self._executions.inc()
        self._batch_size.observe(run.rows)
        self._compute.observe(run.compute_ns / 1e9)
        for ns in run.queue_ns:
            self._queue.observe(ns / 1e9)


class _RepositoryCollector:
    """Gauges read from the repository at each scrape."""

    def __init__(self, repository) -> None:
        self._repository = repository

    def collect(self):
        state = GaugeMetricFamily("rnnserve_model_state", "1 for the model version's state, 0 for the others",
                                  labels=MODEL_LABELS + ("state",))
        live = GaugeMetricFamily("rnnserve_live_sequences", "Live sequences plus open text streams",
                                 labels=MODEL_LABELS)
        queued = GaugeMetricFamily("rnnserve_queue_depth", "Work items waiting in the batcher's queue",
                                   labels=MODEL_LABELS)
        for model, version, current, n_live, n_queued in self._repository.gauges():
            for s in STATES:
                state.add_metric([model, version, s], 1.0 if s == current else 0.0)
            live.add_metric([model, version], n_live)
            queued.add_metric([model, version], n_queued)
        return [state, live, queued]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:   # scrapes are not news
        pass


class _MetricsServer(ThreadingWSGIServer):
    def handle_error(self, request, client_address) -> None:   # e.g. a failed TLS handshake
        log.debug("metrics endpoint: a request from %s failed", client_address[0], exc_info=True)


class MetricsEndpoint:
    """The HTTP(S) server of one registry on host:port (0 = a free port): GET /metrics.
    With an ssl context (serve/frontend/tls.py) it speaks HTTPS; the handshake happens in the
    request's own thread, so a client that never finishes one holds up nobody else."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, context: ssl.SSLContext | None = None):
        server_class = type("MetricsServer", (_MetricsServer,),
                            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        try:
            self._httpd: WSGIServer = make_server(host.strip("[]"), port, make_wsgi_app(registry), server_class,
                                      handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        if context is not None:
            # typeshed leaves socketserver's `socket` untyped for subclasses; an SSLSocket is a socket
            self._httpd.socket = context.wrap_socket(  # type: ignore[assignment]
                self._httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rnnserve-metrics", daemon=True)
        self._thread.start()
        self.port: int = self._httpd.server_port
        log.info("Prometheus metrics on %s://%s:%d/metrics", "https" if context else "http", host, self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)


def start_endpoint(metrics: Metrics | None, host: str, port: int,
                   context: ssl.SSLContext | None = None) -> MetricsEndpoint | None:
    """The endpoint for --metrics-port (-1 = none); HTTPS with `context`."""
    if port < 0:
        return None
    if metrics is None:
        raise ValueError("--metrics-port is set but the data plane was made without metrics "
                         "(ServeSettings.metrics_port -1)")
    return MetricsEndpoint(metrics.registry, host, port, context)
