"""TextStream: send text chunk by chunk, get each chunk's predictions back, with the
recurrent state kept on the server between chunks (the data-plane side of the
bidirectional TextService.Stream RPC).

Each chunk is one run through the model's Batcher carrying the stream's state,
so chunks of many open streams share onnxruntime runs. Feeding a text in chunks
of any sizes gives the predictions of Predict on the whole text (the same
characters; probabilities equal to float32 rounding), with positions numbered
across the whole stream.

An open stream counts as a live sequence of its model (max_sequences) and keeps
its model version loaded until close(), even across a reload.
"""
from __future__ import annotations

import contextlib
import threading

from rnnserve.serve.dataplane import answers, textgen, validation
from rnnserve.serve.engine.model_engine import ModelEngine
from rnnserve.serve.errors import InvalidArgument
from rnnserve.serve.wire.types import PredictResult


class TextStream:
    """Not thread-safe for concurrent feeds by design: chunks are fed one after another."""

    def __init__(self, engine: ModelEngine, top_k: int, max_seq_len: int):
        inst = engine.inst
        if not inst.streamable:
            raise InvalidArgument(f"model '{inst.name}' is bidirectional: it needs the whole text at once, "
                                  "so it cannot stream; use Predict")
        self._lock = threading.Lock()
        self._closed = True                  # until the slot is taken
        self.engine = engine
        self.top_k = top_k
        self.max_seq_len = max_seq_len
        self.position = 0                    # characters fed so far
        self._state = engine.zero_states(1)
        engine.open_text_stream()            # Unavailable past max_sequences
        self._closed = False

    @property
    def model_name(self) -> str:
        return self.engine.inst.name

    @property
    def model_version(self) -> str:
        return self.engine.inst.version

    def feed(self, text: str) -> PredictResult:
        """Predictions for this chunk's positions, continuing from the state the earlier chunks left."""
        inst = self.engine.inst
        with self._lock:
            if self._closed:
                raise InvalidArgument("the text stream is closed")
            if text == "":  # nothing to predict; no run
                return PredictResult(model_name=inst.name, model_version=inst.version, decoded="", positions=[])
            ids = validation.encode_text(inst, text, self.max_seq_len, what="text chunk")
            answers.check_text(inst.name, inst.version, len(ids), min(self.top_k, inst.vocab_size),
                               self.engine.settings.max_response_bytes, "Stream chunk")
            logits, state = textgen.step(self.engine, ids[None, :], self._state)
            found = textgen.positions(inst, ids, logits[0], self.top_k, offset=self.position)
            self._state = state
            self.position += len(ids)
        return PredictResult(model_name=inst.name, model_version=inst.version,
                             decoded="".join(p.char for p in found), positions=found)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.engine.close_text_stream()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a stream nobody closed must not hold its slot forever
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()
