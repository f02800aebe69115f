"""The gRPC server on grpc.aio: the inference and text servicers, grpc.health.v1 and reflection.

    server, port = create_server(settings)        # binds settings.host:settings.port (0 = free)
    server.start()
    ...
    server.stop(grace=10)                        # drain: in-flight calls get `grace` seconds

One event loop, on its own thread, serves every RPC; its methods are usable from plain
synchronous code (tests, serve/__main__.py). A stream is a coroutine and holds no thread,
so idle streams cost memory only; onnxruntime runs on the Batcher's threads and their
results reach the loop through a LoopBridge (serve/frontend/bridge.py). Open streams and
unary calls in progress are bounded (--max-streams, --max-concurrent-calls): past them a
call gets RESOURCE_EXHAUSTED (serve/frontend/limits.py); gRPC itself refuses anything
beyond both plus a margin for health checks.

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
requests above settings.max_message_bytes (after decompression) are refused by gRPC, and
answers above settings.max_response_bytes by the data plane before the run.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.eventloop import new_event_loop
from rnnserve.serve.eventloop import resolve as resolve_event_loop
from rnnserve.serve.frontend import auth, tls
from rnnserve.serve.frontend.bridge import LoopBridge
from rnnserve.serve.frontend.decoding import add_servicer
from rnnserve.serve.frontend.grpc_errors import status_for
from rnnserve.serve.frontend.limits import CallLimits, set_limits
from rnnserve.serve.frontend.observe import RequestObservation
from rnnserve.serve.frontend.priority import handler_initializer, lower_this_thread
from rnnserve.serve.frontend.servicers import InferenceServicer, TextServicer
from rnnserve.serve.metrics import start_endpoint
from rnnserve.serve.settings import ServeSettings
from rnnserve.serve.wire.gen import _pool
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import text_service_pb2 as tpb

logger = logging.getLogger(__name__)

HEALTH_REFRESH_S = 1.0
DRAIN_POLL_S = 0.01
DRAIN_SETTLE_S = 0.5
PROBE_MARGIN = 256   # calls gRPC admits beyond our bounds: health and reflection
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
        self._stopped = threading.Event()
        self._health_names: set = set()
        self._refresher: asyncio.Future | None = None
        self.limits = CallLimits(settings.max_streams, settings.max_concurrent_calls)
        self.policy = auth.load_policy(settings.token_file, settings.tokens, settings.health_needs_token)
        self.certificates = tls.certificate_files(settings)   # None without TLS
        self.reflection = settings.reflection if settings.reflection is not None else not self.policy.enabled
        # Calls that wait inside the data plane (text API, repository changes) run here.
        self._blocking = futures.ThreadPoolExecutor(
            max_workers=settings.grpc_workers, thread_name_prefix="rnnserve-call",
            initializer=handler_initializer(settings.handler_sched_batch, settings.handler_nice))
        self.event_loop = resolve_event_loop(settings.event_loop)   # "uvloop" or "asyncio"
        self._loop = new_event_loop(settings.event_loop)
        self._thread = threading.Thread(target=self._run_loop, name="rnnserve-grpc", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._build())
        except BaseException:
            self._close_loop()
            raise
        self.address = address(settings.host, self.port)
        auth.warn_if_open(self.policy, settings.host)
        # Bound last, so a failure above leaves no endpoint behind; it serves from now on.
        context = self.certificates.ssl_context() if self.certificates is not None else None
        self._metrics_endpoint = start_endpoint(dataplane.metrics, settings.host, settings.metrics_port, context)
        self.metrics_port: int | None = getattr(self._metrics_endpoint, "port", None)

    # -- the loop thread -----------------------------------------------------------------------
    def _run_loop(self) -> None:
        lower_this_thread(self.settings.handler_sched_batch, self.settings.handler_nice)
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coroutine, timeout: float | None = None):
        """Run a coroutine on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._blocking.shutdown(wait=False)

    async def _build(self) -> int:
        s = self.settings
        bounds = [s.max_streams, s.max_concurrent_calls]
        self._health = health.aio.HealthServicer()
        # Calls the loop has not yet picked up wait in gRPC core, which drops them (CANCELLED)
        # past its pending-request limits (1000 soft, 3000 hard by default): a burst of new
        # streams must be able to wait there up to our own bounds.
        pending = max(1000, sum(bounds) + PROBE_MARGIN) if all(bounds) else 2**31 - 1
        # Every answered inference request -> ModelStatistics and the Prometheus request series.
        observation = RequestObservation(self.dataplane.record_request)
        checks = [auth.AuthInterceptor(self.policy, status_for)] if self.policy.enabled else []
        self.grpc_server = grpc.aio.server(
            interceptors=checks,
            # The data plane refuses, before the run, any request whose answer would be larger
            # (serve/dataplane/answers.py), so gRPC's check and ours agree.
            options=[("grpc.max_send_message_length", s.max_response_bytes),
                     ("grpc.max_receive_message_length", s.max_message_bytes),
                     ("grpc.so_reuseport", 0),
                     ("grpc.server.max_pending_requests", pending),
                     ("grpc.server.max_pending_requests_hard_limit", pending)],
            maximum_concurrent_rpcs=sum(bounds) + PROBE_MARGIN if all(bounds) else None)
        bridge = LoopBridge(asyncio.get_running_loop())
        inference = InferenceServicer(self.dataplane, self.dataplane.admin, bridge, self._blocking,
                                      on_repository_change=self.refresh_health,
                                      observe_stream_request=observation.stream_request)
        text = TextServicer(self.dataplane, self._blocking)
        for servicer in (inference, text):
            set_limits(servicer, self.limits)
        add_servicer(self.grpc_server, inference, INFERENCE_SERVICE, observation.handlers)
        add_servicer(self.grpc_server, text, TEXT_SERVICE, observation.handlers)
        add_servicer(self.grpc_server, self._health, HEALTH_SERVICE)
        if self.reflection:
            reflection.enable_server_reflection(SERVICE_NAMES, self.grpc_server, pool=reflection_pool())
        return self._bind(s.host, s.port)

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

    async def _start(self) -> None:
        await self._refresh_health()
        await self.grpc_server.start()
        self._refresher = asyncio.ensure_future(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_REFRESH_S)
            await self._refresh_health()

    async def _refresh_health(self) -> None:
        """Set every health status from the data plane's readiness."""
        if self._stopping.is_set():
            return
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
            await self._health.set(name, _SERVING if ready else _NOT_SERVING)

    async def _shut(self, grace: float) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self.grpc_server.stop(grace)

    # -- public, from any thread but the loop's ------------------------------------------------
    def start(self) -> Server:
        self._call(self._start())
        return self

    def reload_certificates(self) -> None:
        """Re-read the TLS files for the next connections (SIGHUP); nothing without TLS."""
        if self.certificates is not None:
            self.certificates.reload()

    def refresh_health(self) -> None:
        """Re-read the data plane's readiness into the health statuses (from any thread)."""
        try:
            running = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            running = False
        if running:
            asyncio.ensure_future(self._refresh_health())
        else:
            self._call(self._refresh_health())

    @property
    def open_streams(self) -> int:
        return self.limits.streams

    def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: new inference requests get UNAVAILABLE (retryable elsewhere) and
        readiness turns false while the work in flight finishes, for up to `grace` seconds in
        all; then gRPC stops (what is still open gets the rest of the grace) and the models
        are released."""
        if self._stopping.is_set():
            self._stopped.wait()
            return
        grace = self.settings.grace if grace is None else grace
        until = time.monotonic() + grace
        self._stopping.set()
        self._call(self._health.enter_graceful_shutdown())   # every status NOT_SERVING from now on
        logger.info("draining: up to %.1fs for in-flight calls", grace)
        self.dataplane.start_draining()
        while self.dataplane.inflight() > 0 and time.monotonic() < until:
            time.sleep(DRAIN_POLL_S)
        # Calls already on their way are still taken and answered UNAVAILABLE for a moment:
        # grpc.aio would cancel a call that reaches it once it is stopping.
        time.sleep(max(0.0, min(DRAIN_SETTLE_S, until - time.monotonic())))
        self._call(self._shut(max(0.0, until - time.monotonic())))
        self._close_loop()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        if self._owns_dataplane:
            self.dataplane.close()
        self._stopped.set()
        logger.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """True if `timeout` passed first (as grpc's), False once the server has stopped."""
        return not self._stopped.wait(timeout)


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
