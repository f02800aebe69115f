"""serve/wire/gen/ is what scripts/gen_protos.py makes from protos/, and protos/ speaks
Triton's wire format: every message, field number, type, enum value and RPC we
declare is checked against the descriptors tritonclient ships."""
from __future__ import annotations

import importlib.util

import pytest
from google.protobuf import descriptor as _d
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from rnnserve.serve.wire.gen import _pool, grpc_service_pb2, model_config_pb2, text_service_pb2
from tests.fixtures import ROOT


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_in_sync(tmp_path):
    fresh = _load_generator().generate(tmp_path)
    committed = ROOT / "serve" / "wire" / "gen"
    fresh_files = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed_files = sorted(p.name for p in committed.iterdir() if p.suffix == ".py")
    assert fresh_files == committed_files, "run `python scripts/gen_protos.py`"
    for name in fresh_files:
        assert (fresh / name).read_bytes() == (committed / name).read_bytes(), (
            f"serve/wire/gen/{name} is stale: run `python scripts/gen_protos.py`")


def test_private_pool_coexists_with_tritonclient():
    assert grpc_service_pb2.DESCRIPTOR.pool is _pool.POOL
    assert triton_service.DESCRIPTOR.pool is not _pool.POOL
    ours = grpc_service_pb2.ModelInferRequest(model_name="m", raw_input_contents=[b"\x01"])
    ours.parameters["sequence_id"].uint64_param = 7
    theirs = triton_service.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "m" and theirs.parameters["sequence_id"].uint64_param == 7


def _field_type(field) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return str(field.type)


def _check_message(ours: _d.Descriptor, theirs: _d.Descriptor) -> int:
    assert ours.full_name == theirs.full_name
    checked = 0
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{ours.full_name}.{field.name} is not in Triton's message"
        where = f"{ours.full_name}.{field.name}"
        assert field.number == other.number, where
        assert _field_type(field) == _field_type(other), where
        assert field.is_repeated == other.is_repeated, where
        ours_oneof = field.containing_oneof.name if field.containing_oneof else None
        their_oneof = other.containing_oneof.name if other.containing_oneof else None
        assert ours_oneof == their_oneof, where
        checked += 1
    for nested in ours.nested_types:
        other = theirs.nested_types_by_name.get(nested.name)
        assert other is not None, f"{nested.full_name} is not nested in Triton's {theirs.full_name}"
        checked += _check_message(nested, other)
    for enum in ours.enum_types:
        _check_enum(enum, theirs.enum_types_by_name[enum.name])
    return checked


def _check_enum(ours, theirs) -> None:
    assert ours.full_name == theirs.full_name
    for value in ours.values:
        assert theirs.values_by_name[value.name].number == value.number, value.name


@pytest.mark.parametrize("ours_module, theirs_module", [
    (model_config_pb2, triton_config),
    (grpc_service_pb2, triton_service),
], ids=["model_config", "grpc_service"])
def test_field_numbers_match_tritonclient(ours_module, theirs_module):
    ours, theirs = ours_module.DESCRIPTOR, theirs_module.DESCRIPTOR
    checked = 0
    for name, message in ours.message_types_by_name.items():
        checked += _check_message(message, theirs.message_types_by_name[name])
    for name, enum in ours.enum_types_by_name.items():
        _check_enum(enum, theirs.enum_types_by_name[name])
    assert checked > 30


def test_service_matches_tritonclient():
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    required = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
                "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}
    assert {m.name for m in ours.methods} == required
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name, method.name
        assert method.output_type.full_name == other.output_type.full_name, method.name
        assert method.client_streaming == other.client_streaming, method.name
        assert method.server_streaming == other.server_streaming, method.name


def test_text_service_shape():
    service = text_service_pb2.DESCRIPTOR.services_by_name["TextService"]
    assert service.full_name == "rnnserve.v1.TextService"
    assert {m.name: (m.client_streaming, m.server_streaming) for m in service.methods} == {
        "Predict": (False, False), "Generate": (False, True), "Score": (False, False),
        "Stream": (True, True)}
    assert text_service_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["seed"].has_presence
