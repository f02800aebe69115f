"""config.pbtxt (serve/admin/modelconfig.py) and how a model's I/O is worked out without our
metadata (serve/admin/describe.py): the rules, and the errors that say what to declare."""
from __future__ import annotations

import pytest

from rnnserve import serving
from rnnserve.contract import GraphTensor as G
from rnnserve.modelspec import SpecError
from rnnserve.serve.admin.describe import describe, state_partners
from rnnserve.serve.admin.modelconfig import ConfigError, model_settings, parse_config
from rnnserve.serve.settings import ServeSettings

SETTINGS = ServeSettings(repository="unused")


def spec_of(inputs, outputs, config: str | None = None):
    return describe(inputs, outputs, None, parse_config(config).proto if config is not None else None).spec


# -- config.pbtxt --------------------------------------------------------------------------------
def test_supported_fields_override_the_server_flags():
    cfg = parse_config("""
        max_batch_size: 8
        dynamic_batching { max_queue_delay_microseconds: 100 }
        instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 } ]
        parameters { key: "allow_nonfinite" value { string_value: "true" } }
    """)
    s = model_settings(cfg, SETTINGS)
    assert (s.max_batch_size, s.max_queue_delay_us, s.instances) == (8, 100, 3)
    assert s.sequence_idle_timeout_s == SETTINGS.sequence_idle_timeout_s and cfg.allow_nonfinite
    seq = model_settings(parse_config("max_batch_size: 0\nsequence_batching { max_sequence_idle_microseconds: "
                                      "2000000 direct { max_queue_delay_microseconds: 50 } }"), SETTINGS)
    assert (seq.max_batch_size, seq.max_queue_delay_us, seq.sequence_idle_timeout_s) == (
        SETTINGS.max_batch_size, 50, 2.0)
    assert model_settings(None, SETTINGS) is SETTINGS
    assert not parse_config('parameters { key: "allow_nonfinite" value { string_value: "no" } }').allow_nonfinite


def test_server_defaults_are_the_shared_ones():
    from rnnserve.export import tritonconfig
    assert SETTINGS.max_batch_size == serving.MAX_BATCH_SIZE == tritonconfig.DEFAULT_MAX_BATCH_SIZE
    assert SETTINGS.max_queue_delay_us == serving.MAX_QUEUE_DELAY_US == tritonconfig.DYNAMIC_BATCH_DELAY_US
    assert SETTINGS.sequence_idle_timeout_s * 1e6 == serving.SEQUENCE_IDLE_US == tritonconfig.SEQUENCE_IDLE_US


def test_fields_we_do_not_act_on_are_named():
    cfg = parse_config("""
        name: "m"
        version_policy { latest { num_versions: 2 } }
        dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [ 4 ] }
        optimization { execution_accelerators { cpu_execution_accelerator: [ { name: "openvino" } ] } }
        model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value { dims: [ 4 ] zero_data: true } } } ]
    """)
    assert cfg.ignored == ("dynamic_batching.preferred_batch_size", "version_policy.latest.num_versions",
                           "model_warmup", "optimization")


@pytest.mark.parametrize("text, fragment", [
    ("max_batch_size: [", "Couldn't parse integer"),
    ("input { name: 3 }", "Expected string"),
    ("max_batch_size: 4 }", "Expected identifier"),
    ("max_batch_size: -1", "max_batch_size must be >= 0"),
])
def test_a_config_that_does_not_parse_says_why(text, fragment):
    with pytest.raises(ConfigError, match="config.pbtxt") as err:
        parse_config(text)
    assert fragment in str(err.value)


# -- the I/O from the graph ----------------------------------------------------------------------
@pytest.mark.parametrize("name, partner", [("h0", "hn"), ("c0", "cn"), ("h", "hn"), ("state", "stateN"),
                                           ("state", "state_out"), ("hidden_in", "hidden_out"),
                                           ("past_kv", "present_kv"), ("h_prev", "h_next"), ("mem", "new_mem")])
def test_state_naming_patterns(name, partner):
    assert partner.lower() in state_partners(name)


def test_batch_axes_from_the_symbol_of_the_first_input():
    spec = spec_of([G("state", "float32", (2, "n", 16)), G("x", "float32", ("n", 64)), G("sr", "int64", ())],
                   [G("y", "float32", ("n", 1)), G("stateN", "float32", (2, "n", 16))])
    assert [(t.name, t.batch_axis) for t in spec.inputs] == [("x", 0), ("sr", None)]
    assert spec.states[0].batch_axis == 1 and spec.states[0].concrete_shape(3) == (2, 3, 16)
    assert not spec.fixed_batch


def test_names_that_pair_but_shapes_that_do_not_stay_plain_inputs():
    spec = spec_of([G("x", "float32", ("b", 4)), G("h0", "float32", ("b", 8))],
                   [G("y", "float32", ("b", 2)), G("hn", "float32", ("b", 9))])
    assert spec.states == () and [t.name for t in spec.inputs] == ["x", "h0"]


@pytest.mark.parametrize("inputs, outputs, fragment", [
    ([G("x", "float32", ("b", 4)), G("h0", "float32", ("b", 8)), G("h", "float32", ("b", 8))],
     [G("y", "float32", ("b", 2)), G("hn", "float32", ("b", 8))], "could be the next state of both"),
    ([G("x", "float32", ("b", 4)), G("h", "float32", ("b", 8))],
     [G("y", "float32", ("b", 2)), G("hn", "float32", ("b", 8)), G("h_out", "float32", ("b", 8))],
     "could pair with outputs"),
    ([G("x", "float32", (None, 4)), G("h", "float32", (1, None, 8))],
     [G("y", "float32", (None, 2)), G("hn", "float32", (1, None, 8))], "cannot tell the batch axis"),
    ([G("x", "float32", ("b", 4)), G("h", "float32", (1, "k", 8))],
     [G("y", "float32", ("b", 2)), G("hn", "float32", (1, "k", 8))], "cannot tell the batch axis of state"),
    ([G("x", "float32", ("b", 4)), G("h", "float32", ("b", "k"))],
     [G("y", "float32", ("b", 2)), G("hn", "float32", ("b", "k"))], "dynamic dims"),
])
def test_ambiguity_says_what_to_declare(inputs, outputs, fragment):
    with pytest.raises(SpecError, match=fragment) as err:
        spec_of(inputs, outputs)
    assert "declare" in str(err.value) and "config.pbtxt" in str(err.value)


def test_a_config_declares_what_the_graph_leaves_open():
    inputs = [G("x", "float32", (None, None, 4)), G("s", "float32", (2, None, 8))]
    outputs = [G("y", "float32", (None, None, 2)), G("s_new", "float32", (2, None, 8))]
    spec = spec_of(inputs, outputs, """
        input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, -1, 4 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, -1, 2 ] } ]
        sequence_batching { state [ { input_name: "s" output_name: "s_new" data_type: TYPE_FP32 dims: [ 2, -1, 8 ] } ] }
    """)
    assert spec.inputs[0].batch_axis == 0 and spec.outputs[0].batch_axis == 0
    assert spec.states[0].batch_axis == 1 and spec.states[0].concrete_shape(5) == (2, 5, 8)


def test_a_batch_first_config_puts_the_batch_axis_first():
    spec = spec_of([G("x", "float32", (None, 4)), G("s", "float32", (None, 8))],
                   [G("y", "float32", (None, 1)), G("t", "float32", (None, 8))], """
        max_batch_size: 16
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
        sequence_batching { state [ { input_name: "s" output_name: "t" data_type: TYPE_FP32 dims: [ 8 ] } ] }
    """)
    assert [t.batch_axis for t in spec.inputs + spec.outputs] == [0, 0] and spec.states[0].batch_axis == 0


@pytest.mark.parametrize("config, fragment", [
    ('input [ { name: "nope" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]', "does not have"),
    ('input [ { name: "x" data_type: TYPE_INT64 dims: [ -1, 4 ] } ]', "the graph says float32"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 5 ] } ]', "say 5 where the graph has 4"),
    ('max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]', "adds the batch axis"),
])
def test_a_config_that_contradicts_the_graph_is_refused(config, fragment):
    with pytest.raises(SpecError, match=fragment):
        spec_of([G("x", "float32", ("b", 4))], [G("y", "float32", ("b", 2))], config)
