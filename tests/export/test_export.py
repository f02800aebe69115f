"""export/: real checkpoints -> real model.onnx files -> real onnxruntime sessions.

Every model is exported once (session fixtures); the parity gate runs inside each export.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

from rnnserve.contract import (
    DIM_BATCH,
    DIM_SEQ,
    INPUT_TOKENS,
    KEY_CHECKPOINT_SHA256,
    KEY_MODEL_CONFIG,
    KEY_VOCAB,
    OUTPUT_LOGITS,
    parse_metadata,
)
from rnnserve.export.__main__ import main as export_main
from rnnserve.export.onnx_export import (
    DEFAULT_OPSET,
    FAILED_PARITY_FILENAME,
    MODEL_FILENAME,
    PARITY_FILENAME,
    ExportError,
    check_io,
    export_checkpoint,
)
from rnnserve.export.parity import ATOL, BATCHES, RTOL, make_session
from rnnserve.files import file_sha256
from rnnserve.train.checkpoint import load_checkpoint, save_checkpoint
from rnnserve.train.hello import INPUT_TEXT, train_hello
from rnnserve.train.model import PRESET_NAMES, CharRNN, ModelConfig

EXTRA_MODELS = {
    "bilstm2": ModelConfig(arch="lstm", vocab_size=7, emb_size=6, hidden_size=12, num_layers=2, bidirectional=True),
    "gru3": ModelConfig(arch="gru", vocab_size=7, emb_size=6, hidden_size=12, num_layers=3),
}
ALL_MODELS = list(PRESET_NAMES) + list(EXTRA_MODELS)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint path, hello prediction or None). Presets are trained on hello -> ohlol."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in PRESET_NAMES:
        res = train_hello(name, str(root / name), verbose=False)
        out[name] = (res.ckpt_path, res.predicted)
    torch.manual_seed(1)
    for name, cfg in EXTRA_MODELS.items():
        path = str(root / name / "checkpoint.pt")
        save_checkpoint(path, CharRNN(cfg), list("abcdefg"), {"task": "random", "seq_len": 16}, {})
        out[name] = (path, None)
    return out


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory):
    """name -> ExportResult, each model exported (and gated) once, lazily."""
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = export_checkpoint(checkpoints[name][0], str(root / name))
        return cache[name]
    return get


def _meta(path):
    return parse_metadata(make_session(path).get_modelmeta().custom_metadata_map)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_export_passes_parity_gate(name, exported, checkpoints):
    res = exported(name)
    report = res.parity
    assert report["pass"], report
    assert report["worst"]["ratio"] <= 1
    assert (report["tolerance"]["atol"], report["tolerance"]["rtol"]) == (ATOL, RTOL)
    assert sorted(os.listdir(os.path.dirname(res.onnx_path))) == [MODEL_FILENAME, PARITY_FILENAME]
    with open(res.parity_path) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    # The gate covers batches {1,3,16} x seq_lens {1,2,7,T,4T,1000}.
    _, ckpt = load_checkpoint(checkpoints[name][0])
    t = ckpt["train_config"]["seq_len"]
    want = {(b, s) for b in BATCHES for s in (1, 2, 7, t, 4 * t, 1000)}
    assert {(c["batch"], c["seq"]) for c in report["cases"]} == want
    assert all(c["argmax_mismatches"] == 0 for c in report["cases"])
    meta = _meta(res.onnx_path)
    if meta.streamable:  # one token at a time carrying hn/cn == the whole sequence
        assert {c["seq"] for c in report["stepwise"]} >= {t, 64}
        assert all(c["pass"] and c["ratio"] <= 1 for c in report["stepwise"])
        assert all(c["outputs"].keys() == {OUTPUT_LOGITS, *meta.state_outputs} for c in report["cases"])
    else:
        assert report["stepwise"] == []


@pytest.mark.parametrize("name", ALL_MODELS)
def test_declared_shapes_are_symbolic_and_checker_passes(name, exported):
    proto = onnx.load(exported(name).onnx_path)
    onnx.checker.check_model(proto, full_check=True)
    meta = parse_metadata({p.key: p.value for p in proto.metadata_props})
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    state = [meta.num_layers * meta.num_directions, DIM_BATCH, meta.hidden_size]
    assert dims[INPUT_TOKENS] == [DIM_BATCH, DIM_SEQ]
    assert dims[OUTPUT_LOGITS] == [DIM_BATCH, DIM_SEQ, meta.vocab_size]
    for s in meta.state_inputs + meta.state_outputs:
        assert dims[s] == state
    assert list(dims) == [INPUT_TOKENS, *meta.state_inputs, OUTPUT_LOGITS, *meta.state_outputs]
    if meta.arch == "rnncell":  # exported as the native RNN op the loop equals, not unrolled
        assert [n.op_type for n in proto.graph.node].count("RNN") == 1


@pytest.mark.parametrize("name", ALL_MODELS)
def test_dynamic_shapes_run_in_onnxruntime(name, exported, checkpoints):
    res = exported(name)
    sess = make_session(res.onnx_path)
    meta = _meta(res.onnx_path)
    model, _ = load_checkpoint(checkpoints[name][0])
    rng = np.random.default_rng(7)
    for batch, seq in [(1, 1), (2, 3), (5, 17), (4, 301)]:
        feeds = {INPUT_TOKENS: rng.integers(0, meta.vocab_size, (batch, seq), dtype=np.int64)}
        for s in meta.state_inputs:
            feeds[s] = rng.standard_normal(meta.state_shape(batch)).astype(np.float32)
        outs = sess.run(None, feeds)
        assert outs[0].shape == (batch, seq, meta.vocab_size) and outs[0].dtype == np.float32
        for o in outs[1:]:
            assert o.shape == meta.state_shape(batch)
        state = tuple(torch.from_numpy(feeds[s]) for s in meta.state_inputs) or None
        with torch.no_grad():
            ref, _ = model(torch.from_numpy(feeds[INPUT_TOKENS]), state)
        np.testing.assert_allclose(outs[0], ref.numpy(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_metadata_round_trips(name, exported, checkpoints):
    ckpt_path = checkpoints[name][0]
    _, ckpt = load_checkpoint(ckpt_path)
    res = exported(name)
    meta = _meta(res.onnx_path)
    assert meta.vocab == ckpt["vocab"]
    assert meta.config == ckpt["model_config"]
    assert meta.train_config == ckpt["train_config"]
    assert meta.checkpoint_sha256 == file_sha256(ckpt_path)
    assert meta.versions["torch"] == str(torch.__version__)
    assert meta.versions["onnx"] == onnx.__version__
    proto = onnx.load(res.onnx_path)
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    assert meta.opset == opset == DEFAULT_OPSET
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    assert meta.streamable == cfg.streamable
    assert meta.state_shape(3) == cfg.state_shape(3)
    assert len(meta.state_inputs) == (0 if cfg.bidirectional else 2 if cfg.arch == "lstm" else 1)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_onnx_model_answers_hello_like_pytorch(name, exported, checkpoints):
    meta = _meta(exported(name).onnx_path)
    sess = make_session(exported(name).onnx_path)
    ids = np.array([[meta.vocab.index(c) for c in INPUT_TEXT]], dtype=np.int64)
    feeds = {INPUT_TOKENS: ids, **{s: np.zeros(meta.state_shape(1), np.float32) for s in meta.state_inputs}}
    logits = sess.run([OUTPUT_LOGITS], feeds)[0]
    assert "".join(meta.vocab[i] for i in logits[0].argmax(-1)) == checkpoints[name][1]


def test_parse_metadata_rejects_bad_props(exported):
    good = dict(_meta_props(exported("emb-lstm").onnx_path))
    parse_metadata(good)
    bad_cases = [
        ({k: v for k, v in good.items() if k != KEY_VOCAB}, KEY_VOCAB),
        ({**good, KEY_MODEL_CONFIG: "{not json"}, KEY_MODEL_CONFIG),
        ({**good, KEY_VOCAB: json.dumps(["a", "b"])}, "vocab"),
        ({**good, KEY_CHECKPOINT_SHA256: "xyz"}, KEY_CHECKPOINT_SHA256),
    ]
    for props, needle in bad_cases:
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            parse_metadata(props)


def _meta_props(path):
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def test_check_io_rejects_a_fixed_seq_dim(exported):
    proto = onnx.load(exported("emb-gru").onnx_path)
    meta = parse_metadata({p.key: p.value for p in proto.metadata_props})
    seq_dim = proto.graph.input[0].type.tensor_type.shape.dim[1]
    seq_dim.dim_value = 5  # what the dynamo exporter does silently
    with pytest.raises(ExportError, match="tokens: declared shape"):
        check_io(proto, meta)


def test_cli_exports_and_prints_summary(checkpoints, tmp_path, capsys):
    assert export_main([checkpoints["rnn"][0], "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and str(tmp_path / MODEL_FILENAME) in out
    assert "max rel diff" in out and "worst ref" in out  # the per-case table
    assert (tmp_path / MODEL_FILENAME).is_file() and (tmp_path / PARITY_FILENAME).is_file()


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_cli_bad_checkpoint_is_a_clear_error(kind, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.pt"
    if kind == "corrupt":
        ckpt.write_bytes(b"this is not a torch checkpoint\x00\x01")
    out_dir = tmp_path / "out"
    assert export_main([str(ckpt), "--out", str(out_dir)]) == 2   # a user error
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert ("not found" if kind == "missing" else "is not a torch checkpoint") in err
    assert not (out_dir / MODEL_FILENAME).exists()


def test_failed_gate_leaves_no_model(checkpoints, tmp_path, capsys):
    # A zero tolerance: the float32 rounding differences between the two runtimes fail it.
    out_dir = tmp_path / "out"
    assert export_main([checkpoints["emb-lstm"][0], "--out", str(out_dir), "--atol", "0", "--rtol", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert "parity gate failed" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(out_dir)) == [FAILED_PARITY_FILENAME]  # no model.onnx, no temp file
    report = json.loads((out_dir / FAILED_PARITY_FILENAME).read_text())
    assert report["pass"] is False and report["max_abs_diff"] > 0
