"""rnnserve.modelspec and the format-2 metadata: round trips and the errors that say what is wrong."""
from __future__ import annotations

import pytest

from rnnserve.contract import (
    FORMAT_GENERAL,
    KEY_FORMAT,
    KEY_IO,
    build_general_metadata,
    char_model_spec,
    parse_metadata,
)
from rnnserve.modelspec import ModelSpec, SpecError, StatePair, TensorDecl

FORECASTER = ModelSpec(
    inputs=(TensorDecl("features", "float32", ("batch", "seq", 5), batch_axis=0, time_axis=1),
            TensorDecl("rate", "int64", (), batch_axis=None)),
    outputs=(TensorDecl("forecast", "float32", ("batch", "seq", 24), batch_axis=0, time_axis=1),),
    states=(StatePair("hidden_in", "hidden_out", "float32", (2, "batch", 128), batch_axis=1),))


def test_spec_round_trips_through_json():
    again = ModelSpec.from_json(FORECASTER.to_json())
    assert again == FORECASTER
    assert again.state_inputs == ["hidden_in"] and again.state_outputs == ["hidden_out"]
    assert again.streamable and again.input("rate").batch_axis is None
    assert again.states[0].concrete_shape(3) == (2, 3, 128)
    assert again.input("features").datatype == "FP32"


def test_general_metadata_round_trips():
    props = build_general_metadata(spec=FORECASTER, torch_version="2.13.0", onnx_version="1.17", opset=17,
                                   feature_names=["a", "b", "c", "d", "e"], class_names=None)
    assert props[KEY_FORMAT] == FORMAT_GENERAL and KEY_IO in props
    meta = parse_metadata(props)
    assert meta.spec == FORECASTER and not meta.is_char_model
    assert meta.feature_names == ["a", "b", "c", "d", "e"] and meta.vocab == [] and meta.class_names == []
    assert meta.state_inputs == ["hidden_in"] and meta.opset == 17


def test_char_models_have_a_spec():
    cfg = {"arch": "lstm", "vocab_size": 4, "hidden_size": 8, "num_layers": 2, "bidirectional": False}
    spec = char_model_spec(cfg, ["h0", "c0"], ["hn", "cn"])
    assert [t.name for t in spec.inputs] == ["tokens"] and [t.name for t in spec.outputs] == ["logits"]
    assert spec.states[1] == StatePair("c0", "cn", "float32", (2, "batch", 8), batch_axis=1)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["inputs"][0].update(dtype="complex64"), "unsupported dtype"),
    (lambda d: d["inputs"][0].update(batch_axis=3), "batch_axis 3 is outside"),
    (lambda d: d["inputs"][0].update(time_axis=0), "time axis cannot be the batch axis"),
    (lambda d: d["outputs"].append(dict(d["outputs"][0])), "output names repeat"),
    (lambda d: d.update(inputs=[]), "at least one non-state input"),
    (lambda d: d["states"][0].update(shape=[2, "batch", -1]), "dims are sizes"),
    (lambda d: d["inputs"][0].pop("name"), "malformed model spec"),
])
def test_bad_specs_say_what_is_wrong(mutate, message):
    d = FORECASTER.to_dict()
    mutate(d)
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_dict(d)


def test_a_state_dim_other_than_batch_must_be_fixed():
    pair = StatePair("s", "s_out", "float32", ("layers", "batch", 4), batch_axis=1)
    with pytest.raises(SpecError, match="must be fixed"):
        pair.concrete_shape(2)
