"""DataPlane: inference and metadata, with no gRPC in it.

The gRPC servicers convert protobuf to the plain types of serve/wire/types.py, call
these methods, and map the serve.errors.* they raise to status codes. Repository
administration (the initial load, load/unload, the index, polling) is beside it in
serve/admin/admin.py (RepositoryAdmin, `dataplane.admin`); the data plane only looks
models up. All model execution of requests goes through each loaded version's
ModelEngine (serve/engine/model_engine.py): a dynamic Batcher, plus a SequenceManager
for streamable models, in front of ModelInstance.run. Concurrent requests of one model
share onnxruntime runs.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

from rnnserve import __version__
from rnnserve.contract import PLATFORM
from rnnserve.serve.admin.admin import RepositoryAdmin
from rnnserve.serve.admin.repository import Repository
from rnnserve.serve.admin.scan import READY
from rnnserve.serve.dataplane import answers, inference, sequence_rows, textgen, validation
from rnnserve.serve.dataplane.textstream import TextStream
from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.model_engine import ModelEngine
from rnnserve.serve.engine.promise import Promise
from rnnserve.serve.errors import InvalidArgument, ServeError, Unavailable
from rnnserve.serve.metrics import Metrics
from rnnserve.serve.settings import ServeSettings, with_machine_defaults
from rnnserve.serve.stats import RequestRecord
from rnnserve.serve.wire.types import (
    GenerateEvent,
    InferRequest,
    InferResponse,
    ModelConfigInfo,
    ModelMetadata,
    ModelStats,
    PredictResult,
    ScoreResult,
    ServerMetadata,
    StateSpec,
)

log = logging.getLogger(__name__)

# Many sequences in one request (per-row sequence_id inputs: serve/dataplane/sequence_rows.py).
SEQUENCE_ROWS_EXTENSION = "rnnserve_sequence_rows"
# What this server implements, in Triton's extension names, plus our own.
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "parameters", "sequence",
              "rnnserve_text", SEQUENCE_ROWS_EXTENSION)


class DataPlane:
    def __init__(self, settings: ServeSettings):
        self.settings = with_machine_defaults(settings)
        self._ready = False
        self._closed = False
        self._draining = False
        # Prometheus metrics (serve/metrics.py) when settings.metrics_port >= 0; the server serves them.
        self.metrics: Metrics | None = Metrics() if settings.metrics_port >= 0 else None
        self.admin = RepositoryAdmin(self.settings, self.metrics)

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load and warm every model (RepositoryAdmin.load); raises DeviceError (an Unavailable)
        if --device cannot be honoured."""
        self.admin.load()
        self._ready = True

    def close(self) -> None:
        self._ready = False
        self._closed = True
        self.admin.close()

    def server_live(self) -> bool:
        return not self._closed

    def server_ready(self) -> bool:
        return self._ready and not self._closed and not self._draining

    @property
    def repo(self) -> Repository:
        return self.admin.repository

    def engine(self, name: str, version: str = "") -> ModelEngine:
        """The READY engine for (name, version): NotFound if unknown, Unavailable if not loaded
        or if the server is draining (new requests then go to another replica; work already
        in flight finishes)."""
        if self._draining:
            raise Unavailable("the server is shutting down; send the request to another instance")
        return self.repo.get(name, version)

    def start_draining(self) -> None:
        """Refuse new inference requests (UNAVAILABLE) and report not ready; in-flight work goes on."""
        self._draining = True
        log.info("draining: new inference requests are refused with UNAVAILABLE")

    def inflight(self) -> int:
        """Inference work in flight across every model (queued, running, open streams)."""
        return self.repo.inflight() if self.admin.loaded else 0

    # -- metadata --------------------------------------------------------------------------------
    def model_ready(self, name: str, version: str = "") -> bool:
        return self.repo.entry(name, version).state == READY and not self._draining

    def model_names(self) -> list[str]:
        return self.repo.names()

    def providers(self) -> list[str]:
        """Active onnxruntime providers across the loaded models (the requested ones if none loaded)."""
        active: list[str] = []
        if self.admin.loaded:
            for e in self.repo.entries():
                if e.engine is not None:
                    active += [p for p in e.engine.inst.providers if p not in active]
        return active or list(self.admin.requested_providers)

    def server_metadata(self) -> ServerMetadata:
        extensions = list(EXTENSIONS) + [f"onnxruntime_provider:{p}" for p in self.providers()]
        return ServerMetadata(name=self.settings.server_name, version=__version__, extensions=extensions)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        inst = self.repo.get(name, version).inst        # metadata still answers while draining
        controls = list(sequence_rows.CONTROL_SPECS) if inst.streamable else []
        return ModelMetadata(name=name, versions=self.repo.ready_versions(name), platform=PLATFORM,
                             inputs=list(inst.inputs) + controls, outputs=list(inst.outputs),
                             parameters=inst.describe())

    def model_config(self, name: str, version: str = "") -> ModelConfigInfo:
        """What is in force for the model (its config.pbtxt over the server's flags), in Triton's terms.

        max_batch_size 0 and full shapes: a state's batch axis need not be first ([L, batch, H]),
        which Triton's batch-first dims cannot describe, so the batch axis stays explicit (-1)
        in every shape; the batch limit in force is dynamic_batching's preferred_batch_size
        (and parameters.max_batch_size). dynamic_batching describes the batcher every model has;
        streamable models also report sequence_batching with their state pairs (h0 <- hn, ...),
        which makes perf_analyzer run its sequence mode. State inputs are `optional`: omitted =
        the zero state (stateless requests) or the server-kept state (sequence requests after START)."""
        engine = self.repo.get(name, version)
        inst, s = engine.inst, engine.settings
        inputs = [dataclasses.replace(t, optional=t.name in inst.state_inputs) for t in inst.inputs]
        specs = {t.name: t for t in inst.inputs}
        if inst.streamable:   # the per-row sequence controls (serve/dataplane/sequence_rows.py)
            inputs += sequence_rows.CONTROL_SPECS
        sequence = None
        if inst.streamable:
            sequence = {"max_sequence_idle_microseconds": int(s.sequence_idle_timeout_s * 1e6),
                        "states": [StateSpec(i, o, specs[i].datatype, list(specs[i].shape))
                                   for i, o in inst.state_pairs()]}
        batch = s.max_batch_size if inst.io.mergeable else 1
        parameters = {"max_batch_size": str(batch), "allow_nonfinite": str(inst.allow_nonfinite).lower(),
                      "io_source": inst.source}
        facts = inst.describe()  # a client needs these to build inputs / read outputs (JSON lists)
        parameters.update({k: facts[k] for k in ("feature_names", "class_names") if k in facts})
        return ModelConfigInfo(name=name, platform=PLATFORM, max_batch_size=0, inputs=inputs,
                               outputs=list(inst.outputs),
                               dynamic_batching={"preferred_batch_size": [batch],
                                                 "max_queue_delay_microseconds": s.max_queue_delay_us},
                               sequence_batching=sequence, instance_count=s.instances, parameters=parameters)

    # -- tensors ---------------------------------------------------------------------------------
    def infer(self, req: InferRequest) -> InferResponse:
        """Run one request (stateless, or a step of a sequence: parameters sequence_id /
        sequence_start / sequence_end, Triton's semantics). Waits with cancellation polling:
        a cancelled call leaves the queue (Cancelled), a queued request past its deadline
        is dropped (DeadlineExceeded)."""
        params = validation.parameters_or_none(req.parameters)
        engine = self._engine_for(req, params)   # its batcher's max batch: the model's config.pbtxt may set it
        return inference.infer(engine, req, self.settings.max_seq_len, engine.batcher.max_batch_size, params)

    def _engine_for(self, req: InferRequest, params: validation.RequestParams | None) -> ModelEngine:
        """The engine a request goes to. A sequence stays on the version it started on: a later
        step that names no version goes to the loaded version that holds the sequence (in memory,
        else, with a shared state store, by its record), not to a newer version loaded since.
        params: the request's checked parameters (None when they are invalid: the request is
        refused where it runs)."""
        engine = self.engine(req.model_name, req.model_version)
        if req.model_version or params is None:
            return engine
        seq_id, start = params.sequence_id, params.sequence_start
        if start or seq_id in (0, "") or engine.sequences is None or engine.sequences.holds(seq_id):
            return engine
        others = [(e.engine, e.engine.sequences) for e in reversed(self.repo.entry_list(req.model_name))
                  if e.state == READY and e.engine is not None and e.engine is not engine
                  and e.engine.sequences is not None]
        if not others:
            return engine
        for other, sequences in others:
            if sequences is not None and sequences.holds(seq_id):
                return other
        version = engine.sequences.stored_version(seq_id)
        return next((o for o, _ in others if o.inst.version == version), engine)

    def submit(self, req: InferRequest, hold: Callable[[Batcher], None] | None = None) -> inference.Pending:
        """Validate and queue one request; returns at once (the asyncio front end awaits
        Pending.raw off its loop). Raises serve.errors.* for what is wrong before queueing.
        hold: called with the batcher the request goes to, before it is queued there (the front
        end's Coalescer)."""
        params = validation.parameters_or_none(req.parameters)
        engine = self._engine_for(req, params)
        if hold is not None:
            hold(engine.batcher)
        return inference.submit(engine, req, self.settings.max_seq_len, engine.batcher.max_batch_size, params)

    def infer_async(self, req: InferRequest) -> Future[InferResponse]:
        """Queue one request and return at once, for pipelined streams (ModelStreamInfer).

        Never raises: every error (unknown model, invalid input, queue full, too many
        sequences, START required, deadline, cancellation) comes through the future as a
        serve.errors.* exception. Validation and queueing happen before it returns, so
        requests submitted in arrival order keep that order, and the steps of one sequence
        run in it. The future completes; the caller decides how long to wait.
        """
        try:
            params = validation.parameters_or_none(req.parameters)
            engine = self._engine_for(req, params)
            return inference.submit(engine, req, self.settings.max_seq_len,
                                    engine.batcher.max_batch_size, params).response_future()
        except ServeError as e:
            failed: Future = Promise()
            failed.set_exception(e)
            return failed

    # -- text --------------------------------------------------------------------------------------
    def predict_text(self, model: str, text: str, top_k: int = 3, version: str = "") -> PredictResult:
        """top_k 0 = no top list (argmax only); top_k above the vocabulary size lists the whole vocabulary."""
        engine = self.engine(model, version)
        inst = engine.inst
        validation.check_text_model(inst)
        k = validation.check_top_k(top_k, self.settings.max_top_k)
        ids = validation.encode_text(inst, text, self.settings.max_seq_len)
        answers.check_text(inst.name, inst.version, len(ids), min(k, inst.vocab_size),
                           engine.settings.max_response_bytes, "Predict")
        decoded, positions = textgen.predict(engine, ids, k)
        return PredictResult(model_name=inst.name, model_version=inst.version, decoded=decoded, positions=positions)

    def generate(self, model: str, prompt: str, max_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), version: str = "") -> Iterator[GenerateEvent]:
        """Validates now (errors raise here, not on the first next()), then streams one event per token."""
        engine = self.engine(model, version)
        inst = engine.inst
        validation.check_text_model(inst)
        if not inst.streamable:
            raise InvalidArgument(f"model '{inst.name}' is bidirectional: it needs the whole sequence "
                                  f"at once, so it cannot generate text")
        validation.check_generate_args(max_tokens, temperature, top_k, top_p, seed, stop,
                                       self.settings.max_generate_tokens)
        ids = validation.encode_text(inst, prompt, self.settings.max_seq_len, what="prompt")
        return self._generate_stream(engine, ids, max_tokens, float(temperature), int(top_k), float(top_p),
                                     seed, list(stop))

    @staticmethod
    def _generate_stream(engine: ModelEngine, ids, *args) -> Iterator[GenerateEvent]:
        with engine.hold():
            yield from textgen.generate(engine, ids, *args)

    def score(self, model: str, text: str, version: str = "") -> ScoreResult:
        engine = self.engine(model, version)
        inst = engine.inst
        validation.check_text_model(inst)
        if inst.bidirectional:
            raise InvalidArgument(f"model '{inst.name}' is bidirectional: its predictions see the "
                                  f"characters they would score, so it cannot score text")
        ids = validation.encode_text(inst, text, self.settings.max_seq_len)
        if len(ids) < 2:
            raise InvalidArgument("text to score needs at least 2 characters "
                                  "(each character is scored given the ones before it)")
        n, ll = textgen.score(engine, ids)
        nats, bits = textgen.per_char(n, ll)
        return ScoreResult(model_name=inst.name, model_version=inst.version, num_predicted=n,
                           log_likelihood=ll, nats_per_char=nats, bits_per_char=bits)

    def open_text_stream(self, model: str, version: str = "", top_k: int = 3) -> TextStream:
        """A stream for TextService.Stream: feed(chunk) -> that chunk's PredictResult, the state kept
        between chunks; close() when done. Counts as a live sequence (Unavailable past
        max_sequences); bidirectional models refuse (InvalidArgument)."""
        engine = self.engine(model, version)
        validation.check_text_model(engine.inst)
        k = validation.check_top_k(top_k, self.settings.max_top_k)
        return TextStream(engine, k, self.settings.max_seq_len)

    # -- statistics --------------------------------------------------------------------------------
    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        """Per version: rows served (inference_count) and onnxruntime runs (execution_count), batch_stats
        by real batch size, queue and compute times, request outcomes (serve/stats.py)."""
        repo = self.repo
        if name:
            entries = [repo.entry(name, version)] if version else repo.entry_list(name)
        else:
            entries = repo.entries()
        return [e.engine.counters.snapshot() for e in entries if e.engine is not None]

    def record_request(self, record: RequestRecord) -> None:
        """One answered request (the front end's observation, serve/frontend/observe.py): into the
        Prometheus request series and the success / fail counts of the version it went to. The
        labels are that version (the newest READY one when it named none); "" for what the
        repository does not know."""
        if not self.admin.loaded:
            return
        model, version, entry = self.repo.resolve(record.model, record.version)
        if self.metrics is not None:
            self.metrics.observe_request(record.method, model, version, record.code, record.seconds)
        engine = entry.engine if entry is not None else None
        if engine is not None:
            engine.counters.record_request(record.code == "OK", int(record.seconds * 1e9))

    def live_sequences(self, name: str, version: str = "") -> int:
        """Live server-side sequences of a model version, text streams included (0 if not loaded)."""
        engine = self.repo.entry(name, version).engine
        return engine.live_sequences() if engine is not None else 0
