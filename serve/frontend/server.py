"""The gRPC server: the inference and text servicers, grpc.health.v1 and reflection.

    server, port = create_server(settings)        # binds settings.host:settings.port (0 = free)
    server.start()
    ...
    server.stop(grace=10)                        # drain: in-flight calls get `grace` seconds

Health: "" is the server (SERVING once every model is loaded), and each model's
name is that model; the statuses follow the data plane's readiness (refreshed
after RepositoryModelLoad/Unload and every HEALTH_REFRESH_S; a model removed from
the repository turns NOT_SERVING).

Metrics (settings.metrics_port >= 0): Prometheus text at http://host:metrics_port/metrics
(serve/metrics.py), bound by create_server; `server.metrics_port` is the bound port.

Security (README "Security"): with settings.tls_cert the gRPC port and the metrics endpoint
speak TLS (mTLS with tls_client_ca; serve/frontend/tls.py, reloaded by reload_certificates()
and when the files change); with tokens every call passes serve/frontend/auth.py first;
request bodies that do not decode get INVALID_ARGUMENT (serve/frontend/decoding.py);
requests above settings.max_message_bytes (after decompression) are refused by gRPC.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.frontend import auth, tls
from rnnserve.serve.frontend.decoding import add_servicer
from rnnserve.serve.frontend.grpc_errors import status_for
from rnnserve.serve.frontend.observe import RequestObservation
from rnnserve.serve.frontend.priority import handler_initializer
from rnnserve.serve.frontend.servicers import InferenceServicer, TextServicer
from rnnserve.serve.metrics import start_endpoint
from rnnserve.serve.settings import GRPC_MAX_MESSAGE, ServeSettings
from rnnserve.serve.wire.gen import _pool
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import text_service_pb2 as tpb

logger = logging.getLogger(__name__)

HEALTH_REFRESH_S = 1.0
DRAIN_POLL_S = 0.01
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
TEXT_SERVICE = tpb.DESCRIPTOR.services_by_name["TextService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
SERVICE_NAMES = (INFERENCE_SERVICE.full_name, TEXT_SERVICE.full_name, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_pool_lock = threading.Lock()


def reflection_pool():
    """Our private pool, plus the health and reflection protos so reflection lists them all."""
    with _pool_lock:
        for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
            try:
                _pool.POOL.FindFileByName(file.name)
            except KeyError:
                _pool.POOL.AddSerializedFile(file.serialized_pb)
    return _pool.POOL


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """A bound gRPC server over one DataPlane. Not started until start()."""

    def __init__(self, settings: ServeSettings, dataplane, owns_dataplane: bool):
        self.settings = settings
        self.dataplane = dataplane
        self._owns_dataplane = owns_dataplane
        self._stopping = threading.Event()
        self._health = health.HealthServicer(experimental_non_blocking=True)
        self._health_lock = threading.Lock()
        self._health_names: set = set()
        self.policy = auth.load_policy(settings.token_file, settings.tokens, settings.health_needs_token)
        self.certificates = tls.certificate_files(settings)   # None without TLS
        # Every answered inference request -> ModelStatistics and the Prometheus request series.
        observation = RequestObservation(dataplane.record_request)
        checks = [auth.AuthInterceptor(self.policy, status_for)] if self.policy.enabled else []
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.grpc_workers,
                                       thread_name_prefix="rnnserve-grpc",
                                       initializer=handler_initializer(settings.handler_sched_batch,
                                                                       settings.handler_nice)),
            interceptors=[*checks, observation],
            # Answers are bounded by the request limits (batch, seq, top_k, tokens), so the send
            # limit is the most gRPC can carry.
            options=[("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
                     ("grpc.max_receive_message_length", settings.max_message_bytes),
                     ("grpc.so_reuseport", 0)])
        inference = InferenceServicer(dataplane, dataplane.admin, on_repository_change=self.refresh_health,
                                      observe_stream_request=observation.stream_request)
        text = TextServicer(dataplane)
        metrics = dataplane.metrics
        add_servicer(self.grpc_server, inference, INFERENCE_SERVICE)
        add_servicer(self.grpc_server, text, TEXT_SERVICE)
        add_servicer(self.grpc_server, self._health, HEALTH_SERVICE)
        self.reflection = settings.reflection if settings.reflection is not None else not self.policy.enabled
        if self.reflection:
            reflection.enable_server_reflection(SERVICE_NAMES, self.grpc_server, pool=reflection_pool())
        self.port = self._bind(settings.host, settings.port)
        self.address = address(settings.host, self.port)
        auth.warn_if_open(self.policy, settings.host)
        # Bound last, so a failure above leaves no endpoint behind; it serves from now on.
        context = self.certificates.ssl_context() if self.certificates is not None else None
        self._metrics_endpoint = start_endpoint(metrics, settings.host, settings.metrics_port, context)
        self.metrics_port: int | None = getattr(self._metrics_endpoint, "port", None)
        self._refresher = threading.Thread(target=self._refresh_loop, name="rnnserve-health",
                                           daemon=True)

    def _bind(self, host: str, port: int) -> int:
        try:
            if self.certificates is not None:
                bound = self.grpc_server.add_secure_port(address(host, port), self.certificates.grpc_credentials())
            else:
                bound = self.grpc_server.add_insecure_port(address(host, port))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address(host, port)}: {exc}") from exc
        if bound == 0:
            raise OSError(f"cannot listen on {address(host, port)}")
        return bound

    def start(self) -> Server:
        self.refresh_health()
        self.grpc_server.start()
        self._refresher.start()
        return self

    def reload_certificates(self) -> None:
        """Re-read the TLS files for the next connections (SIGHUP); nothing without TLS."""
        if self.certificates is not None:
            self.certificates.reload()

    def refresh_health(self) -> None:
        """Set every health status from the data plane's readiness."""
        if self._stopping.is_set():
            return
        with self._health_lock:
            try:
                statuses = {"": self.dataplane.server_ready()}
                for name in self.dataplane.model_names():
                    statuses[name] = self.dataplane.model_ready(name)
            except Exception:  # noqa: BLE001 - a failed probe means not serving
                logger.exception("health refresh failed")
                statuses = {"": False}
            for name in self._health_names - statuses.keys():   # removed from the repository
                statuses[name] = False
            self._health_names = set(statuses)
            for name, ready in statuses.items():
                self._health.set(name, _SERVING if ready else _NOT_SERVING)

    def _refresh_loop(self) -> None:
        while not self._stopping.wait(HEALTH_REFRESH_S):
            self.refresh_health()

    def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: new inference requests get UNAVAILABLE (retryable elsewhere) and
        readiness turns false while the work in flight finishes, for up to `grace` seconds in
        all; then gRPC stops (what is still open gets the rest of the grace) and the models
        are released."""
        grace = self.settings.grace if grace is None else grace
        until = time.monotonic() + grace
        self._stopping.set()
        self._health.enter_graceful_shutdown()   # every status NOT_SERVING from now on
        logger.info("draining: up to %.1fs for in-flight calls", grace)
        self.dataplane.start_draining()
        while self.dataplane.inflight() > 0 and time.monotonic() < until:
            time.sleep(DRAIN_POLL_S)
        self.grpc_server.stop(max(0.0, until - time.monotonic())).wait()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        if self._owns_dataplane:
            self.dataplane.close()
        logger.info("stopped")


def create_server(settings: ServeSettings, dataplane=None) -> tuple[Server, int]:
    """-> (server, bound port). Without a dataplane, one is made and loaded from settings.
    ValueError, before anything is loaded, for settings out of range (ServeSettings.problems)."""
    settings.check()
    owns = dataplane is None
    if owns:
        dataplane = DataPlane(settings)
        try:
            dataplane.load()
        except BaseException:
            dataplane.close()
            raise
    try:
        server = Server(settings, dataplane, owns_dataplane=owns)
    except BaseException:
        if owns:
            dataplane.close()
        raise
    return server, server.port
