"""onnxruntime sessions: execution providers (--device cpu|cuda|auto), threads,
warm-up, and ModelInstance, the one place where a model's session runs.

Every onnxruntime call of the server goes through ModelInstance.run(feeds); the
model's engine (serve/engine/model_engine.py: batcher, sequences) sits in front of
exactly that call and owns its instance.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from rnnserve.contract import INPUT_TOKENS, OUTPUT_LOGITS, ModelMeta, multichar_tokens
from rnnserve.serve.errors import ServeError, Unavailable
from rnnserve.serve.wire.types import TensorSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("cpu", "cuda", "auto")

# onnxruntime's type strings -> Open Inference Protocol datatypes.
_ORT_DATATYPES = {"tensor(int64)": "INT64", "tensor(float)": "FP32", "tensor(int32)": "INT32",
                  "tensor(double)": "FP64", "tensor(float16)": "FP16", "tensor(bool)": "BOOL"}

# onnxruntime 1.32's CPU NchwcTransformer (part of ORT_ENABLE_ALL) segfaults creating a session for
# an fp16 graph (export variant `-fp16`), killing the server. It only rewrites Conv/Pool-style ops into
# the NCHWc layout, which recurrent models never use, so it is disabled for every session: the nodes
# the CPU provider runs (all of them on --device cpu; the fall-backs under CUDA) are the ones it touches.
DISABLED_OPTIMIZERS = ("NchwcTransformer",)

# (batch, seq) shapes run at load so the first request does not pay for allocation.
WARMUP_SHAPES = ((1, 1), (1, 16), (4, 64))
WARMUP_REPEATS = 2
ZEROS_CACHED_BATCH = 256   # zero states up to this batch are made once and shared


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
                   inter_op_threads: int = 1) -> ort.InferenceSession:
    """Open one session; fail (cuda) or log the fall-back (auto) if CUDA was asked for but is not active."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = int(inter_op_threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only; our own log says what matters
    # No busy-waiting in the intra-op pool: spinning threads starve the gRPC threads that
    # share the cores, and the batcher feeds one run at a time anyway.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    return TensorSpec(node.name, _ORT_DATATYPES.get(node.type, node.type), shape)


class ModelInstance:
    """One loaded version of one model: metadata, session, I/O specs.

    `run(feeds)` is the only method that runs onnxruntime. It fills zero h0/c0
    for state inputs the caller omitted.
    """

    def __init__(self, name: str, version: str, path: str, session: ort.InferenceSession,
                 meta: ModelMeta):
        self.name = name
        self.version = version
        self.path = path
        self.session = session
        self.meta = meta
        self.providers: list[str] = session.get_providers()
        self.inputs: list[TensorSpec] = [_spec(n) for n in session.get_inputs()]
        self.outputs: list[TensorSpec] = [_spec(n) for n in session.get_outputs()]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self.state_inputs: list[str] = list(meta.state_inputs)
        self.state_outputs: list[str] = list(meta.state_outputs)
        self.vocab: list[str] = list(meta.vocab)
        self.char_to_id: dict[str, int] = {c: i for i, c in enumerate(self.vocab)}
        self.multichar_tokens: list[str] = multichar_tokens(self.vocab)   # any: the text API refuses
        self._zeros: dict[int, np.ndarray] = {}
        self._check_graph()

    # -- facts -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    @property
    def bidirectional(self) -> bool:
        return self.meta.num_directions == 2

    @property
    def streamable(self) -> bool:
        return self.meta.streamable

    def state_shape(self, batch: int):
        return self.meta.state_shape(batch)

    def zeros(self, batch: int) -> np.ndarray:
        """The zero state of one state input for `batch` rows: shared and read-only (cached)."""
        z = self._zeros.get(batch)
        if z is None:
            z = np.zeros(self.state_shape(batch), np.float32)
            z.flags.writeable = False
            if batch <= ZEROS_CACHED_BATCH:
                self._zeros[batch] = z
        return z

    def state_pairs(self):
        """[(input name, output name)]: h0<-hn, c0<-cn."""
        return list(zip(self.state_inputs, self.state_outputs))

    def _check_graph(self) -> None:
        """The graph must have exactly the I/O that the metadata promises."""
        want_in, want_out = self.meta.io_spec()
        if [s.name for s in want_in] != self.input_names or [s.name for s in want_out] != self.output_names:
            raise ValueError(f"graph I/O {self.input_names} -> {self.output_names} does not match the metadata "
                             f"({[s.name for s in want_in]} -> {[s.name for s in want_out]})")
        dtypes = {s.name: s.datatype for s in self.inputs + self.outputs}
        if dtypes[INPUT_TOKENS] != "INT64" or dtypes[OUTPUT_LOGITS] != "FP32":
            raise ValueError(f"graph dtypes {dtypes} do not match the I/O contract (tokens INT64, logits FP32)")

    # -- the one onnxruntime call --------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on validated feeds; omitted state inputs are zeros. Returns {output name: array}."""
        feeds = dict(feeds)
        batch = int(feeds[INPUT_TOKENS].shape[0])
        for name in self.state_inputs:
            if name not in feeds:
                feeds[name] = self.zeros(batch)
        try:
            values = self.session.run(self.output_names, feeds)
        except Exception as e:  # validation ran first, so this is our fault, not the client's
            log.exception("onnxruntime failed on model %s version %s", self.name, self.version)
            raise ServeError(f"onnxruntime failed running model '{self.name}': {type(e).__name__}") from e
        return dict(zip(self.output_names, values))

    def warmup(self, max_seq_len: int) -> None:
        """A few runs at a few shapes, before the engine exists: they are not counted in the statistics."""
        t0 = time.perf_counter()
        for batch, seq in WARMUP_SHAPES:
            seq = min(seq, max_seq_len)
            tokens = np.zeros((batch, seq), np.int64)
            for _ in range(WARMUP_REPEATS):
                self.run({INPUT_TOKENS: tokens})
        log.info("warmed up %s version %s in %.1f ms", self.name, self.version, (time.perf_counter() - t0) * 1e3)

    def describe(self) -> dict[str, str]:
        """Free-form facts for ModelMetadata.parameters."""
        cfg = self.meta.config
        return {
            "providers": ",".join(self.providers),
            "version": self.version,
            "arch": str(cfg["arch"]),
            "vocab_size": str(self.vocab_size),
            "hidden_size": str(cfg["hidden_size"]),
            "num_layers": str(cfg["num_layers"]),
            "bidirectional": str(self.bidirectional).lower(),
            "streamable": str(self.streamable).lower(),
            "state_inputs": ",".join(self.state_inputs),
            "state_outputs": ",".join(self.state_outputs),
            "checkpoint_sha256": self.meta.checkpoint_sha256,
            "opset": str(self.meta.opset),
            "vocab": json.dumps(self.vocab, ensure_ascii=False),
        }
