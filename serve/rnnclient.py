"""RnnClient: rnnserve's Python client library (the `rnnserve-client` CLI in serve/client.py uses it).

One object per server address: health and readiness, model metadata and config, the
text API (predict, generate, score, stream) and tensor inference (infer, infer_tensors),
with optional TLS/mTLS and a bearer token (README "Security"). Sequence steps carry the
`sequence-id` header so a load balancer can keep a sequence on one replica
(README "Scaling out"); correctness never depends on it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.serve.wire import convert
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import grpc_service_pb2_grpc as pb_grpc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc

DEFAULT_ADDRESS = "127.0.0.1:8001"
MAX_MESSAGE_BYTES = 2**31 - 1


def _dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class RnnClient:
    """A blocking client for both services. Calls raise grpc.RpcError on failure.

    TLS when any of tls / tls_ca / tls_cert is given: tls_ca (PEM file) is the CA the server's
    certificate must chain to (None = the system's CAs); tls_cert + tls_key (PEM files) are the
    client certificate for mTLS. token: sent as `authorization: Bearer <token>` on every call."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = None, *,
                 tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, token: str | None = None):
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if tls or tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca),
                                                       private_key=_read(tls_key),
                                                       certificate_chain=_read(tls_cert))
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._infer = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._text = tpb_grpc.TextServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def _opts(self) -> dict:
        return {"timeout": self.timeout, "metadata": self._metadata}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RnnClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    # -- health and metadata ---------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", ... ("" = the server)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                   **self._opts)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def live(self) -> bool:
        return self._infer.ServerLive(pb.ServerLiveRequest(), **self._opts).live

    def ready(self, model: str = "", version: str = "") -> bool:
        if model:
            return self._infer.ModelReady(pb.ModelReadyRequest(name=model, version=version),
                                          **self._opts).ready
        return self._infer.ServerReady(pb.ServerReadyRequest(), **self._opts).ready

    def models(self) -> list[dict]:
        """Every model version in the repository: name, version, state, reason."""
        reply = self._infer.RepositoryIndex(pb.RepositoryIndexRequest(), **self._opts)
        return [_dict(m) for m in reply.models]

    def metadata(self, model: str = "", version: str = "") -> dict:
        """The server's metadata, or a model's (name, versions, platform, inputs, outputs)."""
        if not model:
            return _dict(self._infer.ServerMetadata(pb.ServerMetadataRequest(),
                                                    **self._opts))
        return _dict(self._infer.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version),
                                               **self._opts))

    def config(self, model: str, version: str = "") -> dict:
        return _dict(self._infer.ModelConfig(pb.ModelConfigRequest(name=model, version=version),
                                             **self._opts).config)

    # -- text ------------------------------------------------------------------------------
    def predict(self, model: str, text: str, top_k: int = 3, version: str = "") -> dict:
        """{"decoded": "ohlol", "positions": [{index, input_char, char, prob, top: [...]}, ...]}"""
        return _dict(self._text.Predict(tpb.PredictRequest(model=model, version=version,
                                                           text=text, top_k=top_k),
                                        **self._opts))

    def generate(self, model: str, prompt: str, max_tokens: int = 100, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] = (), version: str = "") -> Iterator[dict]:
        """Yields {index, token_id, text, finish_reason} as the tokens stream in."""
        request = tpb.GenerateRequest(model=model, version=version, prompt=prompt,
                                      max_tokens=max_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p, stop=list(stop))
        if seed is not None:
            request.seed = seed
        for event in self._text.Generate(request, **self._opts):
            yield _dict(event)

    def score(self, model: str, text: str, version: str = "") -> dict:
        """{log_likelihood, nats_per_char, bits_per_char, num_predicted}"""
        return _dict(self._text.Score(tpb.ScoreRequest(model=model, version=version, text=text),
                                      **self._opts))

    def stream(self, model: str, chunks: Iterable[str], top_k: int = 3,
               version: str = "") -> Iterator[dict]:
        """TextService.Stream: yields one {chunk, decoded, positions: [...]} per chunk, in order,
        as they come back; the server keeps the state, so each chunk costs only its own
        characters. `chunks` is read lazily (a generator can feed it as text arrives)."""
        def requests():
            first = tpb.StreamRequest(model=model, version=version, top_k=top_k)
            for text in chunks:
                if first is not None:
                    first.text = text
                    yield first
                    first = None
                else:
                    yield tpb.StreamRequest(text=text)
            if first is not None:   # no chunks at all: just open (and close) the stream
                yield first

        for reply in self._text.Stream(requests(), **self._opts):
            yield _dict(reply)

    # -- tensors ---------------------------------------------------------------------------
    def infer(self, model: str, tokens: np.ndarray, h0: np.ndarray | None = None,
              c0: np.ndarray | None = None, version: str = "",
              outputs: list[str] | None = None, sequence_id: int | str = 0, start: bool = False,
              end: bool = False, step: int | None = None) -> dict[str, np.ndarray]:
        """tokens int64 [batch, seq] (+ optional h0/c0 float32) -> {"logits": ..., "hn": ...}.
        With sequence_id, one step of a server-side sequence (start / end: Triton's flags; step:
        the step's id, so that a retry is answered exactly once). It sends the `sequence-id`
        header, which a load balancer may hash on to keep a sequence on one replica."""
        inputs = {"tokens": np.asarray(tokens, dtype=np.int64)}
        for name, state in (("h0", h0), ("c0", c0)):
            if state is not None:
                inputs[name] = np.asarray(state, dtype=np.float32)
        return self.infer_tensors(model, inputs, version=version, outputs=outputs, sequence_id=sequence_id,
                                  start=start, end=end, step=step)

    def infer_tensors(self, model: str, inputs: dict[str, np.ndarray], version: str = "",
                      outputs: list[str] | None = None, sequence_id: int | str = 0, start: bool = False,
                      end: bool = False, step: int | None = None) -> dict[str, np.ndarray]:
        """Any model: named numpy inputs (float features, token ids, ...) -> named outputs; with
        sequence_id, one step of a server-side sequence, as for infer()."""
        params, metadata = sequence_parameters(sequence_id, start, end, step)
        request = convert.infer_request_to_proto(model, inputs, version=version, outputs=outputs,
                                                 parameters=params)
        return convert.infer_outputs_from_proto(self._infer.ModelInfer(
            request, timeout=self.timeout, metadata=[*(self._metadata or ()), *metadata]))


SEQUENCE_HEADER = "sequence-id"   # deploy/envoy.yaml hashes on it (locality; never needed for correctness)


def sequence_parameters(sequence_id: int | str = 0, start: bool = False, end: bool = False,
                        step: int | None = None) -> tuple[dict, list[tuple[str, str]]]:
    """(request parameters, call metadata) for one sequence step; ({}, []) outside a sequence."""
    if sequence_id in (0, ""):
        return {}, []
    params = {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end}
    if step is not None:
        params["sequence_step"] = step
    return params, [(SEQUENCE_HEADER, str(sequence_id))]
