"""Protobuf <-> serve.wire.types for everything but tensors: metadata, model config,
statistics, the repository index and the text API. Tensors and inference requests are
serve/wire/convert.py's (the one protobuf <-> numpy module, shared with the client).
"""
from __future__ import annotations

from rnnserve.serve.errors import InvalidArgument, quoted
from rnnserve.serve.wire.gen import grpc_service_pb2 as pb
from rnnserve.serve.wire.gen import model_config_pb2 as mc
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.types import (
    GenerateEvent,
    ModelConfigInfo,
    ModelMetadata,
    ModelStats,
    PredictResult,
    RepositoryEntry,
    ScoreResult,
    ServerMetadata,
    TensorSpec,
)

# ---- metadata, config, statistics, repository ------------------------------

def server_metadata_to_proto(meta: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=meta.name, version=meta.version,
                                     extensions=meta.extensions)


def _tensor_metadata(spec: TensorSpec):
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype,
                                                   shape=spec.shape)


def model_metadata_to_proto(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(name=meta.name, versions=meta.versions,
                                    platform=meta.platform,
                                    inputs=[_tensor_metadata(s) for s in meta.inputs],
                                    outputs=[_tensor_metadata(s) for s in meta.outputs])


def _config_type(datatype: str) -> int:
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return mc.DataType.Value(name) if name in mc.DataType.keys() else mc.TYPE_INVALID


def model_config_to_proto(cfg: ModelConfigInfo) -> pb.ModelConfigResponse:
    """Triton's scheduling_choice is a oneof: a model with sequence_batching carries its
    dynamic batching inside it, as the `oldest` strategy (Triton's equivalent)."""
    config = mc.ModelConfig(
        name=cfg.name, platform=cfg.platform, max_batch_size=cfg.max_batch_size,
        backend="onnxruntime" if cfg.platform == "onnxruntime_onnx" else "",
        input=[mc.ModelInput(name=s.name, data_type=_config_type(s.datatype), dims=s.shape,
                             optional=s.optional) for s in cfg.inputs],
        output=[mc.ModelOutput(name=s.name, data_type=_config_type(s.datatype), dims=s.shape)
                for s in cfg.outputs])
    config.instance_group.add(count=cfg.instance_count)
    for key, value in cfg.parameters.items():
        config.parameters[key].string_value = value
    dyn = cfg.dynamic_batching
    if cfg.sequence_batching is not None:
        seq = config.sequence_batching
        seq.max_sequence_idle_microseconds = int(
            cfg.sequence_batching.get("max_sequence_idle_microseconds", 0))
        for state in cfg.sequence_batching.get("states", []):
            seq.state.add(
                input_name=state.input_name, output_name=state.output_name,
                data_type=_config_type(state.datatype), dims=state.dims,
                initial_state=[mc.ModelSequenceBatching.InitialState(
                    name=f"{state.input_name}_zero", data_type=_config_type(state.datatype),
                    dims=state.dims, zero_data=True)])
        if dyn is not None:
            seq.oldest.preferred_batch_size.extend(dyn.get("preferred_batch_size", []))
            seq.oldest.max_queue_delay_microseconds = int(
                dyn.get("max_queue_delay_microseconds", 0))
    elif dyn is not None:
        config.dynamic_batching.preferred_batch_size.extend(dyn.get("preferred_batch_size", []))
        config.dynamic_batching.max_queue_delay_microseconds = int(
            dyn.get("max_queue_delay_microseconds", 0))
    return pb.ModelConfigResponse(config=config)


def _duration(target, stat) -> None:
    target.count, target.ns = stat.count, stat.ns


def model_stats_to_proto(stats: list[ModelStats]) -> pb.ModelStatisticsResponse:
    msg = pb.ModelStatisticsResponse()
    for s in stats:
        out = msg.model_stats.add(name=s.name, version=s.version,
                                  last_inference=s.last_inference_ms,
                                  inference_count=s.inference_count,
                                  execution_count=s.execution_count)
        for field in ("success", "fail", "queue", "compute_input", "compute_infer",
                      "compute_output"):
            _duration(getattr(out.inference_stats, field), getattr(s, field))
        for size in sorted(s.batch_stats):
            batch = out.batch_stats.add(batch_size=size)
            _duration(batch.compute_infer, s.batch_stats[size])
    return msg


def repository_index_to_proto(entries: list[RepositoryEntry], ready_only: bool
                              ) -> pb.RepositoryIndexResponse:
    msg = pb.RepositoryIndexResponse()
    for e in entries:
        if not ready_only or e.state == "READY":
            msg.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
    return msg


# ---- text API ---------------------------------------------------------------

def _positions_to_proto(result: PredictResult) -> list:
    return [tpb.PositionPrediction(index=p.index, input_char=p.input_char, char=p.char,
                                   prob=p.prob,
                                   top=[tpb.CharProb(char=c.char, prob=c.prob) for c in p.top])
            for p in result.positions]


def predict_to_proto(result: PredictResult) -> tpb.PredictResponse:
    return tpb.PredictResponse(model=result.model_name, version=result.model_version,
                               decoded=result.decoded, positions=_positions_to_proto(result))


def stream_response_to_proto(result: PredictResult, chunk: int) -> tpb.StreamResponse:
    """One TextService.Stream answer: chunk `chunk`'s predictions (the Predict per-position message)."""
    return tpb.StreamResponse(model=result.model_name, version=result.model_version, chunk=chunk,
                              decoded=result.decoded, positions=_positions_to_proto(result))


def stream_open_args(req: tpb.StreamRequest, default_top_k: int) -> dict:
    """Keyword arguments for DataPlane.open_text_stream from the first StreamRequest."""
    if not req.model:
        raise InvalidArgument("the first StreamRequest must name the model")
    return dict(model=req.model, version=req.version, top_k=req.top_k or default_top_k)


def check_stream_followup(req: tpb.StreamRequest, first: tpb.StreamRequest) -> None:
    """A later StreamRequest may repeat the first one's model/version/top_k, never change them."""
    for name in ("model", "version", "top_k"):
        value = getattr(req, name)
        if value and value != getattr(first, name):
            raise InvalidArgument(f"StreamRequest.{name} is set by the first message of a stream "
                                  f"({quoted(getattr(first, name))}); a later message cannot change it "
                                  f"to {quoted(value)}")
    if not req.text:
        raise InvalidArgument("an empty text chunk: only the first StreamRequest may omit text")


def generate_event_to_proto(event: GenerateEvent) -> tpb.GenerateResponse:
    return tpb.GenerateResponse(index=event.index, token_id=event.token_id, text=event.text,
                                finish_reason=event.finish_reason)


def generate_args_from_proto(req: tpb.GenerateRequest) -> dict:
    """Keyword arguments for DataPlane.generate (unset optional fields -> defaults)."""
    return dict(model=req.model, version=req.version, prompt=req.prompt,
                max_tokens=req.max_tokens,
                temperature=req.temperature if req.HasField("temperature") else 1.0,
                top_k=req.top_k, top_p=req.top_p if req.HasField("top_p") else 1.0,
                seed=req.seed if req.HasField("seed") else None, stop=list(req.stop))


def score_to_proto(result: ScoreResult) -> tpb.ScoreResponse:
    return tpb.ScoreResponse(model=result.model_name, version=result.model_version,
                             log_likelihood=result.log_likelihood,
                             nats_per_char=result.nats_per_char,
                             bits_per_char=result.bits_per_char,
                             num_predicted=result.num_predicted)
