"""DataPlane: everything the server does, with no gRPC in it.

The gRPC servicers convert protobuf to the plain types of serve/types.py, call
these methods, and map the serve.errors.* they raise to status codes. All model
execution goes through ModelInstance.run (serve/runtime.py).
"""
from __future__ import annotations

import logging
import threading
import time
from importlib import metadata as pkg_metadata
from typing import Iterator, List, Optional, Sequence

from . import textgen, validation
from .errors import Cancelled, DeadlineExceeded, InvalidArgument, ServeError, Unavailable
from .repository import READY, Repository
from .runtime import ModelInstance, choose_providers
from .settings import ServeSettings
from .types import (GenerateEvent, InferRequest, InferResponse, ModelConfigInfo, ModelMetadata, ModelStats,
                    PredictResult, RepositoryEntry, ScoreResult, ServerMetadata)

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
# What this server implements, in Triton's extension names, plus our own.
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "parameters", "rnnserve_text")


def _package_version() -> str:
    try:
        return pkg_metadata.version("rnnserve")
    except pkg_metadata.PackageNotFoundError:
        return "0.1.0"


class DataPlane:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._repo: Optional[Repository] = None
        self._requested_providers: List[str] = []
        self._ready = False
        self._closed = False
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load and warm every model; raises DeviceError (an Unavailable) if --device cannot be honoured."""
        t0 = time.perf_counter()
        self._requested_providers = choose_providers(self.settings.device)
        repo = Repository(self.settings, self._requested_providers)
        with self._lock:
            self._repo = repo
        repo.load_all()
        entries = repo.entries()
        ready = sum(e.state == READY for e in entries)
        log.info("repository %s: %d of %d model versions READY in %.2f s; active providers: %s",
                 self.settings.repository, ready, len(entries), time.perf_counter() - t0,
                 ", ".join(self.providers()))
        self._ready = True

    def close(self) -> None:
        self._ready = False
        self._closed = True
        if self._repo is not None:
            self._repo.close()

    def server_live(self) -> bool:
        return not self._closed

    def server_ready(self) -> bool:
        return self._ready and not self._closed

    @property
    def repo(self) -> Repository:
        if self._repo is None or self._closed:
            raise Unavailable("the server is not ready: models are not loaded" if not self._closed
                              else "the server is shutting down")
        return self._repo

    def instance(self, name: str, version: str = "") -> ModelInstance:
        """The READY instance for (name, version): NotFound if unknown, Unavailable if not loaded."""
        return self.repo.get(name, version)

    # -- metadata --------------------------------------------------------------------------------
    def model_ready(self, name: str, version: str = "") -> bool:
        return self.repo.entry(name, version).state == READY

    def model_names(self) -> List[str]:
        return self.repo.names()

    def providers(self) -> List[str]:
        """Active onnxruntime providers across the loaded models (the requested ones if none loaded)."""
        if self._repo is None:
            return list(self._requested_providers)
        active: List[str] = []
        for e in self._repo.entries():
            if e.instance is not None:
                active += [p for p in e.instance.providers if p not in active]
        return active or list(self._requested_providers)

    def server_metadata(self) -> ServerMetadata:
        extensions = list(EXTENSIONS) + [f"onnxruntime_provider:{p}" for p in self.providers()]
        return ServerMetadata(name=self.settings.server_name, version=_package_version(), extensions=extensions)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        inst = self.instance(name, version)
        return ModelMetadata(name=name, versions=self.repo.ready_versions(name), platform=PLATFORM,
                             inputs=list(inst.inputs), outputs=list(inst.outputs), parameters=inst.describe())

    def model_config(self, name: str, version: str = "") -> ModelConfigInfo:
        """max_batch_size 0 and full shapes: our state is layers-first [L, batch, H], which Triton's
        batch-first dims cannot describe, so the batch axis stays explicit (-1) in every shape."""
        inst = self.instance(name, version)
        return ModelConfigInfo(name=name, platform=PLATFORM, max_batch_size=0,
                               inputs=list(inst.inputs), outputs=list(inst.outputs))

    # -- tensors ---------------------------------------------------------------------------------
    def infer(self, req: InferRequest) -> InferResponse:
        t0 = time.perf_counter_ns()
        inst = self.instance(req.model_name, req.model_version)
        try:
            params = validation.check_parameters(req.parameters)
            if params.in_sequence:
                raise InvalidArgument("sequence batching is not enabled yet: send requests without "
                                      "'sequence_id' and pass h0/c0 explicitly to carry the state")
            outputs = validation.check_outputs(inst, req.requested_outputs)
            feeds = validation.check_infer_inputs(inst, req.inputs, req.input_datatypes, self.settings.max_seq_len)
            self._check_runnable(req, params.timeout_us, t0)
            t1 = time.perf_counter_ns()
            result = inst.run(feeds, outputs)
            t2 = time.perf_counter_ns()
        except ServeError:
            inst.stats.record_request(False, time.perf_counter_ns() - t0)
            raise
        response = InferResponse(model_name=inst.name, model_version=inst.version, id=req.id,
                                 outputs=[(n, result[n]) for n in outputs])
        t3 = time.perf_counter_ns()
        inst.stats.record_request(True, t3 - t0, rows=int(feeds["tokens"].shape[0]),
                                  input_ns=t1 - t0, output_ns=t3 - t2)
        return response

    @staticmethod
    def _check_runnable(req: InferRequest, timeout_us: int, arrived_ns: int) -> None:
        """Drop a request whose deadline (gRPC deadline or `timeout` parameter) passed, or that was cancelled."""
        if req.is_cancelled is not None and req.is_cancelled():
            raise Cancelled("the request was cancelled before it ran")
        if req.deadline is not None and time.monotonic() > req.deadline:
            raise DeadlineExceeded("the request's deadline passed before it ran")
        if timeout_us and time.perf_counter_ns() - arrived_ns > timeout_us * 1000:
            raise DeadlineExceeded(f"the request's timeout of {timeout_us} us passed before it ran")

    # -- text --------------------------------------------------------------------------------------
    def predict_text(self, model: str, text: str, top_k: int = 3, version: str = "") -> PredictResult:
        """top_k 0 = no top list (argmax only); top_k above the vocabulary size lists the whole vocabulary."""
        inst = self.instance(model, version)
        with self._request(inst):
            k = validation.check_top_k(top_k, self.settings.max_top_k)
            ids = validation.encode_text(inst, text, self.settings.max_seq_len)
            decoded, positions = textgen.predict(inst, ids, k)
        return PredictResult(model_name=inst.name, model_version=inst.version, decoded=decoded, positions=positions)

    def generate(self, model: str, prompt: str, max_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                 stop: Sequence[str] = (), version: str = "") -> Iterator[GenerateEvent]:
        """Validates now (errors raise here, not on the first next()), then streams one event per token."""
        inst = self.instance(model, version)
        with self._request(inst, count=False):
            if not inst.streamable:
                raise InvalidArgument(f"model '{inst.name}' is bidirectional: it needs the whole sequence "
                                      f"at once, so it cannot generate text")
            validation.check_generate_args(max_tokens, temperature, top_k, top_p, seed, stop,
                                           self.settings.max_generate_tokens)
            ids = validation.encode_text(inst, prompt, self.settings.max_seq_len, what="prompt")
        return self._generate_stream(inst, ids, max_tokens, float(temperature), int(top_k), float(top_p),
                                     seed, list(stop))

    def _generate_stream(self, inst, ids, *args) -> Iterator[GenerateEvent]:
        with self._request(inst):
            yield from textgen.generate(inst, ids, *args)

    def score(self, model: str, text: str, version: str = "") -> ScoreResult:
        inst = self.instance(model, version)
        with self._request(inst):
            if inst.bidirectional:
                raise InvalidArgument(f"model '{inst.name}' is bidirectional: its predictions see the "
                                      f"characters they would score, so it cannot score text")
            ids = validation.encode_text(inst, text, self.settings.max_seq_len)
            if len(ids) < 2:
                raise InvalidArgument("text to score needs at least 2 characters "
                                      "(each character is scored given the ones before it)")
            n, ll = textgen.score(inst, ids)
        nats, bits = textgen.per_char(n, ll)
        return ScoreResult(model_name=inst.name, model_version=inst.version, num_predicted=n,
                           log_likelihood=ll, nats_per_char=nats, bits_per_char=bits)

    def _request(self, inst: ModelInstance, count: bool = True):
        return _RequestStats(inst, count)

    # -- statistics and repository -----------------------------------------------------------------
    def model_statistics(self, name: str = "", version: str = "") -> List[ModelStats]:
        repo = self.repo
        if name:
            entries = [repo.entry(name, version)] if version else repo.entry_list(name)
        else:
            entries = repo.entries()
        return [e.instance.stats.snapshot() for e in entries if e.instance is not None]

    def repository_index(self) -> List[RepositoryEntry]:
        return [RepositoryEntry(e.name, e.version, e.state, e.reason) for e in self.repo.entries()]

    def load_model(self, name: str) -> None:
        self.repo.load_model(name)

    def unload_model(self, name: str) -> None:
        self.repo.unload_model(name)


class _RequestStats:
    """Context manager recording one text request's outcome in the model's statistics."""

    def __init__(self, inst: ModelInstance, count: bool):
        self.inst, self.count = inst, count

    def __enter__(self):
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, exc_type, exc, tb):
        failed = exc_type is not None and issubclass(exc_type, ServeError)
        if failed or (self.count and exc_type is None):
            self.inst.stats.record_request(not failed, time.perf_counter_ns() - self.t0)
        return False
