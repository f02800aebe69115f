"""onnxruntime sessions: execution providers (--device cpu|cuda|auto), threads,
warm-up, and ModelInstance, the one place where a model's session runs.

Every onnxruntime call of the server goes through ModelInstance.run(feeds); the
model's engine (serve/engine/model_engine.py: batcher, sequences) sits in front of
exactly that call and owns its instance.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from rnnserve.contract import INPUT_TOKENS, OUTPUT_LOGITS, ModelMeta, multichar_tokens
from rnnserve.modelspec import DTYPES, ModelSpec
from rnnserve.serve.engine.modelio import ModelIO
from rnnserve.serve.errors import ServeError, Unavailable
from rnnserve.serve.wire.types import TensorSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("cpu", "cuda", "auto")

# onnxruntime's type strings -> Open Inference Protocol datatypes.
# onnxruntime type strings -> numpy dtype names (rnnserve.modelspec.DTYPES gives the datatypes).
ORT_DTYPES = {f"tensor({t})": n for t, n in (
    ("float", "float32"), ("double", "float64"), ("float16", "float16"), ("bool", "bool"),
    ("int8", "int8"), ("int16", "int16"), ("int32", "int32"), ("int64", "int64"),
    ("uint8", "uint8"), ("uint16", "uint16"), ("uint32", "uint32"), ("uint64", "uint64"))}

# onnxruntime 1.32's CPU NchwcTransformer (part of ORT_ENABLE_ALL) segfaults creating a session for
# an fp16 graph (export variant `-fp16`), killing the server. It only rewrites Conv/Pool-style ops into
# the NCHWc layout, which recurrent models never use, so it is disabled for every session: the nodes
# the CPU provider runs (all of them on --device cpu; the fall-backs under CUDA) are the ones it touches.
DISABLED_OPTIMIZERS = ("NchwcTransformer",)

# (batch, seq) shapes run at load so the first request does not pay for allocation.
WARMUP_SHAPES = ((1, 1), (1, 16), (4, 64))
WARMUP_REPEATS = 2
ZEROS_CACHED_BATCH = 256   # zero states up to this batch are made once and shared


class _RunsInProgress:
    """onnxruntime runs in progress in this process, over every model. A lone run spins its threads
    on every core, so it is only taken when no other run is in progress: two at once (two models,
    each at concurrency 1) would each wait for the other's threads at every step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def enter(self) -> bool:
        """Count a run that starts; -> True when it is the only one."""
        with self._lock:
            self._count += 1
            return self._count == 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1


_RUNS = _RunsInProgress()


class DeviceError(Unavailable):
    """The requested device cannot be used; the server must not start."""


def choose_providers(device: str) -> list[str]:
    """The providers to request for --device, checked against this onnxruntime build."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise DeviceError(
                f"--device cuda: this onnxruntime build ({ort.__version__}) has no {CUDA} "
                f"(available providers: {', '.join(available)}); install onnxruntime-gpu "
                f"(make install ORT=gpu) instead of onnxruntime, or use --device cpu/auto")
        return [CUDA, CPU]
    if device == "auto":
        if CUDA in available:
            return [CUDA, CPU]
        # The plain CPU install: nothing fell back, so nothing to warn about.
        log.info("--device auto: this onnxruntime build (%s) has no %s; using CPU (available: %s)",
                 ort.__version__, CUDA, ", ".join(available))
        return [CPU]
    raise DeviceError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")


def create_session(path: str, providers: Sequence[str], device: str, intra_op_threads: int = 0,
                   inter_op_threads: int = 1, lone: bool = False) -> ort.InferenceSession:
    """Open one session; fail (cuda) or log the fall-back (auto) if CUDA was asked for but is not active.
    lone: the session of lone runs (ModelInstance.run), whose threads spin while a run is in progress."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = int(inter_op_threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only; our own log says what matters
    # No busy-waiting in the intra-op pool: spinning threads starve the gRPC threads that
    # share the cores, and the batcher feeds one run at a time anyway. A lone run has the
    # machine to itself: its threads spin while it runs (a recurrent run is one short parallel
    # section per step, and waking a sleeping thread for each costs more than the step), and
    # stop spinning when it ends.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if lone else "0")
    if lone:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    # onnxruntime's CPU arena keeps a run's buffers for the next run. Without it every run
    # allocates them afresh, and large ones come as new mappings that fault in page by page
    # (serve/memory.py), which costs more CPU than the run's arithmetic at moderate batches.
    # The arena would keep the peak of the largest run for good, so the Trimmer has it hand
    # its free memory back (ModelInstance.release_memory) when the process has grown.
    so.enable_cpu_mem_arena = True
    sess = ort.InferenceSession(path, sess_options=so, providers=list(providers),
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))
    active = sess.get_providers()
    if CUDA in providers and CUDA not in active:
        if device == "cuda":
            raise DeviceError(
                f"--device cuda: {CUDA} was requested for {path} but onnxruntime is running it on "
                f"{', '.join(active)}: the CUDA/cuDNN libraries could not be loaded or no GPU is visible "
                f"(check LD_LIBRARY_PATH and nvidia-smi)")
        log.warning("--device auto: %s is not active for %s; fell back to %s", CUDA, path, ", ".join(active))
    return sess


def _spec(node) -> TensorSpec:
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in node.shape]
    dtype = ORT_DTYPES.get(node.type)
    return TensorSpec(node.name, DTYPES[dtype] if dtype else node.type, shape)


class ModelInstance:
    """One loaded version of one model: its spec (rnnserve/modelspec.py), session, I/O.

    `run(feeds)` is the only method that runs onnxruntime. It fills the zero state for
    state inputs the caller omitted. `meta` is None for a model without our metadata
    (its spec came from config.pbtxt or the graph: `source`).
    """

    def __init__(self, name: str, version: str, path: str, session: ort.InferenceSession,
                 spec: ModelSpec, meta: ModelMeta | None = None, source: str = "metadata",
                 allow_nonfinite: bool = False, lone_session: ort.InferenceSession | None = None,
                 wide_session: ort.InferenceSession | None = None):
        """lone_session, wide_session: the same model with more threads, for lone runs (run(lone=True))
        and wide runs (run(wide=True)); None: none."""
        self.name = name
        self.version = version
        self.path = path
        self.session = session
        self.lone_session = lone_session
        self.wide_session = wide_session
        self.spec = spec
        self.meta = meta
        self.source = source
        self.allow_nonfinite = allow_nonfinite     # float inputs may hold NaN/Inf (config.pbtxt parameter)
        self.providers: list[str] = session.get_providers()
        self.inputs: list[TensorSpec] = [_spec(n) for n in session.get_inputs()]
        self.outputs: list[TensorSpec] = [_spec(n) for n in session.get_outputs()]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self.state_inputs: list[str] = spec.state_inputs
        self.state_outputs: list[str] = spec.state_outputs
        self.vocab: list[str] = list(meta.vocab) if meta is not None else []
        self.char_to_id: dict[str, int] = {c: i for i, c in enumerate(self.vocab)}
        self.multichar_tokens: list[str] = multichar_tokens(self.vocab)   # any: the text API refuses
        char_model = meta is not None and meta.is_char_model
        # Right-padding is exact for our unidirectional char models only (see modelio.py).
        self.io = ModelIO.from_spec(spec, pad=char_model and spec.streamable)
        self._zeros: dict[int, tuple[np.ndarray, ...]] = {}
        self._shrink: ort.RunOptions | None = ort.RunOptions()   # a run that empties the arena
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    # -- facts -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def bidirectional(self) -> bool:
        return self.meta is not None and self.meta.is_char_model and self.meta.num_directions == 2

    @property
    def streamable(self) -> bool:
        return self.spec.streamable

    @property
    def stateless_why(self) -> str:
        """Why the model cannot carry state, for messages."""
        return "is bidirectional" if self.bidirectional else "has no state inputs"

    @property
    def takes_text(self) -> bool:
        """The text API needs a vocabulary, tokens in and logits out."""
        names = [t.name for t in self.spec.inputs]
        return bool(self.vocab) and names == [INPUT_TOKENS] and OUTPUT_LOGITS in self.output_names

    def zero_states(self, batch: int) -> tuple[np.ndarray, ...]:
        """The zero state of every state input for `batch` rows: shared and read-only (cached)."""
        z = self._zeros.get(batch)
        if z is None:
            z = tuple(np.zeros(s.concrete_shape(batch), s.dtype) for s in self.spec.states)
            for a in z:
                a.flags.writeable = False
            if batch <= ZEROS_CACHED_BATCH:
                self._zeros[batch] = z
        return z

    def state_shape(self, batch: int, name: str | None = None) -> tuple[int, ...]:
        """The shape of state input `name` (the first one by default) for `batch` rows."""
        pair = next(s for s in self.spec.states if name is None or s.input == name)
        return pair.concrete_shape(batch)

    def state_pairs(self):
        """[(input name, output name)]: h0<-hn, c0<-cn, hidden_in<-hidden_out, ..."""
        return list(zip(self.state_inputs, self.state_outputs))

    # -- the one onnxruntime call --------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], lone: bool = False, wide: bool = False) -> dict[str, np.ndarray]:
        """Run the session on validated feeds; omitted state inputs are zeros. Returns {output name: array}.
        lone: a run the model has to itself (the Batcher's call) goes to the lone session, if there is one
        and no other run is in progress in the process: the same graph, so the same answer, sooner.
        wide: a run of many rows (the Batcher's call) goes to the wide session, if there is one."""
        if len(feeds) < len(self.input_names):    # validated feeds: only state inputs can be missing
            feeds = dict(feeds)
            for name, z in zip(self.state_inputs, self.zero_states(self.io.rows(feeds))):
                feeds.setdefault(name, z)
        only = _RUNS.enter()
        if wide and self.wide_session is not None:
            session = self.wide_session
        elif lone and only and self.lone_session is not None:
            session = self.lone_session
        else:
            session = self.session
        try:
            values = session.run(self.output_names, feeds)
        except Exception as e:  # validation ran first, so this is our fault, not the client's
            log.exception("onnxruntime failed on model %s version %s", self.name, self.version)
            raise ServeError(f"onnxruntime failed running model '{self.name}': {type(e).__name__}") from e
        finally:
            _RUNS.leave()
        return dict(zip(self.output_names, values))

    def _zero_feeds(self, batch: int, seq: int) -> dict[str, np.ndarray] | None:
        """Zeros for every non-state input at (batch, seq); None for a model whose inputs are not all
        batched (their values are the client's to choose)."""
        if not all(t.batch_axis is not None for t in self.spec.inputs):
            return None
        return {t.name: np.zeros([batch if i == t.batch_axis else d if isinstance(d, int) else seq
                                  for i, d in enumerate(t.shape)], t.dtype) for t in self.spec.inputs}

    def release_memory(self) -> None:
        """Hand the free memory of onnxruntime's CPU arena back to malloc: a one-row, one-step run
        with the arena shrink option (onnxruntime shrinks only at the end of a run). Safe while other
        runs are in progress: only regions nobody uses are freed. Nothing for a model that cannot be
        run on zeros, or where this onnxruntime has no CPU arena to shrink."""
        feeds = self._zero_feeds(1, 1) if self._shrink is not None else None
        if feeds is None:
            return
        for name, z in zip(self.state_inputs, self.zero_states(1)):
            feeds[name] = z
        try:
            for session in (self.session, self.lone_session, self.wide_session):
                if session is not None:
                    session.run(self.output_names[:1], feeds, self._shrink)
        except Exception as e:  # noqa: BLE001 - memory housekeeping must never break serving
            log.info("model %s version %s: cannot shrink onnxruntime's arena (%s); not trying again",
                     self.name, self.version, e)
            self._shrink = None

    def warmup(self, max_seq_len: int) -> None:
        """A few runs at a few shapes, before the engine exists: they are not counted in the statistics.
        A model whose inputs are not all batched (their values are the client's to choose) is not warmed up."""
        t0 = time.perf_counter()
        for batch, seq in WARMUP_SHAPES:
            if self.spec.fixed_batch and batch > 1:
                continue
            feeds = self._zero_feeds(batch, min(seq, max_seq_len))
            if feeds is None:
                return
            try:
                for _ in range(WARMUP_REPEATS):
                    self.run(feeds)
                    if self.lone_session is not None:
                        self.run(feeds, lone=True)
                    if self.wide_session is not None and batch > 1:
                        self.run(feeds, wide=True)
            except ServeError:
                log.info("model %s version %s: warm-up at batch %d, seq %d failed; serving without it",
                         self.name, self.version, batch, min(seq, max_seq_len))
                break
        log.info("warmed up %s version %s in %.1f ms", self.name, self.version, (time.perf_counter() - t0) * 1e3)

    def describe(self) -> dict[str, str]:
        """Free-form facts for ModelMetadata.parameters."""
        facts = {
            "providers": ",".join(self.providers),
            "version": self.version,
            "io_source": self.source,
            "streamable": str(self.streamable).lower(),
            "state_inputs": ",".join(self.state_inputs),
            "state_outputs": ",".join(self.state_outputs),
            "batched": str(self.io.mergeable).lower(),
            "allow_nonfinite": str(self.allow_nonfinite).lower(),
        }
        meta = self.meta
        if meta is None:
            return facts
        facts.update({"opset": str(meta.opset), "checkpoint_sha256": meta.checkpoint_sha256, "format": meta.format})
        cfg = meta.config
        for key in ("arch", "hidden_size", "num_layers"):
            if key in cfg:
                facts[key] = str(cfg[key])
        if meta.is_char_model:
            facts["bidirectional"] = str(self.bidirectional).lower()
        if self.vocab:
            facts.update(vocab_size=str(self.vocab_size), vocab=json.dumps(self.vocab, ensure_ascii=False))
        for key, names in (("class_names", meta.class_names), ("feature_names", meta.feature_names)):
            if names:
                facts[key] = json.dumps(names, ensure_ascii=False)
        return facts
