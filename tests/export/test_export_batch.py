"""`rnnserve-export batch`: real checkpoints -> a versioned model repository.

Everything is real: hello checkpoints trained by the session fixture, the parity gate,
onnxruntime quantization, Triton's ModelConfig schema (tritonclient), and the server's
own DataPlane loading the published repository.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from rnnserve.contract import KEY_CHECKPOINT_SHA256, parse_metadata
from rnnserve.export.__main__ import main as export_main
from rnnserve.export.int8 import op_counts
from rnnserve.export.publish import MANIFEST_FILENAME, STAGING_PREFIX, sanitize_name
from rnnserve.export.variants import KEY_VARIANT, VARIANT_REPORT, EvalText, make_variant, percent_pair, variant_session
from rnnserve.files import file_sha256
from rnnserve.serve.admin.scan import scan_model, scan_names
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.hello import train_hello
from rnnserve.train.model import PRESET_NAMES, CharRNN, ModelConfig
from tests.fixtures import CHARLM_VOCAB, make_dataplane

EVAL_TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!\n" * 40


def batch(capsys, *args: str):
    """Run the CLI in-process with one thread and no progress bar; returns (exit code, stdout)."""
    capsys.readouterr()
    rc = export_main(["batch", "--no-progress", "--threads", "1", *args])
    return rc, capsys.readouterr().out


def status_of(out: str) -> dict:
    """model -> status, from the final table (the last column)."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 2 and cells[-1] in ("new", "skipped", "failed", "refused"):
            rows[cells[0]] = cells[-1]
    return rows


def props_of(path: str) -> dict:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def check_repository(repo: str) -> dict:
    """The repository is consistent: configs parse as Triton ModelConfig, the manifest matches disk."""
    assert not [d for d in os.listdir(repo) if d.startswith(STAGING_PREFIX)], "staging left behind"
    with open(os.path.join(repo, MANIFEST_FILENAME), encoding="utf-8") as f:
        manifest = json.load(f)
    names = scan_names(repo)  # what the server sees
    assert sorted(manifest["models"]) == names
    for name in names:
        model_dir = os.path.join(repo, name)
        entry = manifest["models"][name]
        versions = [e.version for e in scan_model(repo, name)]
        assert sorted(entry["versions"], key=int) == versions
        assert entry["config"]["sha256"] == file_sha256(os.path.join(model_dir, "config.pbtxt"))
        for v, rec in entry["versions"].items():
            assert "model.onnx" in rec["files"]
            for rel, info in rec["files"].items():
                path = os.path.join(model_dir, v, rel)
                assert info["sha256"] == file_sha256(path) and info["bytes"] == os.path.getsize(path)
            assert props_of(os.path.join(model_dir, v, "model.onnx"))[KEY_CHECKPOINT_SHA256] == rec["checkpoint_sha256"]
        # config.pbtxt against Triton's own schema, and against the newest model's metadata
        with open(os.path.join(model_dir, "config.pbtxt"), encoding="utf-8") as f:
            cfg = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
        meta = parse_metadata(props_of(os.path.join(model_dir, versions[-1], "model.onnx")))
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx"
        assert [i.name for i in cfg.input] == ["tokens"]
        assert cfg.output[0].name == "logits" and list(cfg.output[0].dims)[-1] == meta.vocab_size
        if meta.streamable:
            assert cfg.max_batch_size == 0 and cfg.WhichOneof("scheduling_choice") == "sequence_batching"
            assert list(cfg.input[0].dims) == [1, -1]
            states = cfg.sequence_batching.state
            assert [(s.input_name, s.output_name) for s in states] == list(zip(meta.state_inputs, meta.state_outputs))
            for s in states:
                assert list(s.dims) == list(meta.state_shape(1))
                assert s.initial_state[0].zero_data and list(s.initial_state[0].dims) == list(s.dims)
        else:
            assert cfg.max_batch_size > 0 and cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
            assert list(cfg.input[0].dims) == [-1]
    return manifest


@pytest.fixture()
def hello_ckpts(hello_built, tmp_path) -> str:
    """A writable copy of the five hello checkpoints: DIR/<preset>/checkpoint.pt."""
    root = tmp_path / "ckpts"
    for key, path in hello_built.checkpoints.items():
        shutil.copytree(os.path.dirname(path), root / key.split("/")[0])
    return str(root)


def test_publish_skip_new_version_and_prune(hello_ckpts, tmp_path, capsys):
    repo = str(tmp_path / "repo")
    rc, out = batch(capsys, "--checkpoints", hello_ckpts, "--repository", repo)
    assert rc == 0, out
    assert status_of(out) == {p: "new" for p in PRESET_NAMES}
    manifest = check_repository(repo)
    for preset in PRESET_NAMES:
        ckpt = os.path.join(hello_ckpts, preset, "checkpoint.pt")
        assert [e.version for e in scan_model(repo, preset)] == ["1"]
        rec = manifest["models"][preset]["versions"]["1"]
        assert rec["checkpoint_sha256"] == file_sha256(ckpt)
        assert rec["parity"]["pass"] and rec["parity"]["worst"]["ratio"] <= 1 and rec["parity"]["rtol"] > 0
        assert rec["latency_p50_ms"] > 0
        assert os.path.isfile(os.path.join(repo, preset, "1", "parity.json"))

    rc, out = batch(capsys, "--checkpoints", hello_ckpts, "--repository", repo)
    assert rc == 0 and status_of(out) == {p: "skipped" for p in PRESET_NAMES}, out
    assert all(scan_model(repo, p)[-1].version == "1" for p in PRESET_NAMES)

    # Re-train one model with another seed: a new checkpoint file -> version 2, the rest skipped.
    changed = os.path.join(hello_ckpts, "emb-gru")
    train_hello("emb-gru", changed, seed=7, verbose=False)
    rc, out = batch(capsys, "--checkpoints", os.path.join(hello_ckpts, "*", "checkpoint.pt"), "--repository", repo)
    assert rc == 0 and status_of(out) == {**{p: "skipped" for p in PRESET_NAMES}, "emb-gru": "new"}, out
    assert [e.version for e in scan_model(repo, "emb-gru")] == ["1", "2"]
    new_sha = file_sha256(os.path.join(changed, "checkpoint.pt"))
    assert props_of(os.path.join(repo, "emb-gru", "2", "model.onnx"))[KEY_CHECKPOINT_SHA256] == new_sha
    check_repository(repo)

    rc, out = batch(capsys, "--checkpoints", hello_ckpts, "--repository", repo, "--keep", "1")
    assert rc == 0 and set(status_of(out).values()) == {"skipped"}, out
    assert [e.version for e in scan_model(repo, "emb-gru")] == ["2"]
    assert all([e.version for e in scan_model(repo, p)] == ["1"] for p in PRESET_NAMES if p != "emb-gru")
    manifest = check_repository(repo)
    assert list(manifest["models"]["emb-gru"]["versions"]) == ["2"]

    dp = make_dataplane(repo)  # the server's own loader serves what was published
    try:
        assert {e.name: e.state for e in dp.admin.repository_index()} == {p: "READY" for p in PRESET_NAMES}
        assert dp.model_metadata("emb-gru").versions == ["2"]
    finally:
        dp.close()


def test_failures_do_not_stop_the_others(hello_built, tmp_path, capsys):
    ckpts, repo = tmp_path / "ckpts", str(tmp_path / "repo")
    good = hello_built.checkpoints
    shutil.copytree(os.path.dirname(good["rnn/1"]), ckpts / "rnn")
    shutil.copytree(os.path.dirname(good["emb-lstm/1"]), ckpts / "emb lstm+v1")  # sanitized name
    torch.manual_seed(0)
    bi = CharRNN(ModelConfig(arch="gru", vocab_size=6, emb_size=4, hidden_size=8, num_layers=1, bidirectional=True))
    save_checkpoint(str(ckpts / "bigru" / "checkpoint.pt"), bi, list("abcdef"), {"task": "random", "seq_len": 8}, {})
    os.makedirs(ckpts / "broken")
    (ckpts / "broken" / "checkpoint.pt").write_bytes(b"not a torch checkpoint")
    os.makedirs(ckpts / "half")
    with open(good["emb-rnn/1"], "rb") as f:
        (ckpts / "half" / "checkpoint.pt").write_bytes(f.read()[:400])  # a truncated real checkpoint
    os.makedirs(os.path.join(repo, STAGING_PREFIX + "dead"))  # left by a killed run

    rc, out = batch(capsys, "--checkpoints", str(ckpts), "--repository", repo, "--variants", "int8")
    assert rc == 1, out
    st = status_of(out)
    assert st["rnn"] == st["emb_lstm_v1"] == st["bigru"] == "new"
    assert st["broken"] == st["half"] == "failed"
    assert st["rnn-int8"] == "refused"       # head-less RNN: nothing for int8 to quantize
    failed_block = out.split("FAILED (2):")[1]
    assert "broken" in failed_block and "half" in failed_block and "CheckpointError" in failed_block
    assert "nothing was quantized" in out
    published_variants = {m for m, s in st.items() if m.endswith("-int8") and s == "new"}
    assert set(scan_names(repo)) == {"bigru", "emb_lstm_v1", "rnn"} | published_variants
    check_repository(repo)  # includes: the dead staging folder is gone, no partial folder left


def test_plan_refuses_colliding_names(tmp_path, hello_built, capsys):
    src = os.path.dirname(hello_built.checkpoints["rnn/1"])
    for parent in ("a", "b"):
        shutil.copytree(src, tmp_path / "ckpts" / parent / "same")
    rc, out = batch(capsys, "--checkpoints", str(tmp_path / "ckpts"), "--repository", str(tmp_path / "repo"))
    assert rc == 1 and out.count("also comes from") == 2, out
    assert scan_names(str(tmp_path / "repo")) == []
    assert sanitize_name("..hidden") == "__hidden" and sanitize_name("a b/c") == "a_b_c"
    # --name-from file: the same checkpoint under two file names gives two models.
    flat = tmp_path / "flat"
    os.makedirs(flat)
    for stem in ("alpha", "beta"):
        shutil.copy(os.path.join(src, "checkpoint.pt"), flat / f"{stem}.pt")
    rc, out = batch(capsys, "--checkpoints", str(flat / "*.pt"), "--repository", str(tmp_path / "repo"),
                    "--name-from", "file")
    assert rc == 0 and status_of(out) == {"alpha": "new", "beta": "new"}, out


@pytest.fixture()
def charlm_ckpt(tmp_path) -> str:
    """A small random-weight char LSTM (2 layers) over the charlm test vocabulary."""
    torch.manual_seed(3)
    model = CharRNN(ModelConfig(arch="lstm", vocab_size=len(CHARLM_VOCAB), emb_size=8, hidden_size=32, num_layers=2))
    path = str(tmp_path / "ckpts" / "charlm" / "checkpoint.pt")
    save_checkpoint(path, model, CHARLM_VOCAB, {"task": "charlm", "seq_len": 16}, {})
    return path


def test_int8_and_optimized_variants(charlm_ckpt, tmp_path, capsys):
    repo, text = str(tmp_path / "repo"), tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT, encoding="utf-8")
    args = ["--checkpoints", os.path.dirname(os.path.dirname(charlm_ckpt)), "--repository", repo,
            "--variants", "int8,optimized", "--eval-text", str(text)]

    # An impossible threshold refuses every variant: nothing published, reasons reported.
    rc, out = batch(capsys, *args, "--min-agreement", "100.1")
    assert rc == 0, out
    assert status_of(out) == {"charlm": "new", "charlm-int8": "refused", "charlm-optimized": "refused"}
    assert scan_names(repo) == ["charlm"]
    rec = check_repository(repo)["models"]["charlm"]["versions"]["1"]
    for v in ("int8", "optimized"):
        assert rec[f"variant_{v}"]["accepted"] is False and rec[f"variant_{v}"]["version"] is None
        assert "< threshold 100.100%" in rec[f"variant_{v}"]["reason"]

    # Threshold 0: the base is unchanged (skipped) and the variants are built from the published v1.
    rc, out = batch(capsys, *args, "--min-agreement", "0")
    assert rc == 0 and status_of(out) == {"charlm": "skipped", "charlm-int8": "new", "charlm-optimized": "new"}, out
    manifest = check_repository(repo)
    int8_path = os.path.join(repo, "charlm-int8", "1", "model.onnx")
    ops = op_counts(onnx.load(int8_path))
    # the default option keeps the output layer float32 (export/int8.py)
    assert ops.get("DynamicQuantizeLSTM") == 2 and "LSTM" not in ops and ops.get("MatMul") == 1
    assert "MatMulInteger" not in ops
    props = props_of(int8_path)
    assert props[KEY_VARIANT] == "int8" and parse_metadata(props).vocab == CHARLM_VOCAB
    for v in ("int8", "optimized"):
        with open(os.path.join(repo, f"charlm-{v}", "1", VARIANT_REPORT), encoding="utf-8") as f:
            rep = json.load(f)
        assert rep["accepted"] and rep["eval_text"].startswith("eval-text")
        assert rep["positions"] == (len(EVAL_TEXT) // rep["window"]) * rep["window"]
        assert rep["top1_agreement"] == pytest.approx(1 - rep["top1_disagreements"] / rep["positions"])
        assert manifest["models"][f"charlm-{v}"]["variant"] == v
    int8_rep = manifest["models"]["charlm-int8"]["versions"]["1"]["variant_report"]
    assert int8_rep["max_logit_diff"] > 0  # int8 really changed the numbers
    opt = manifest["models"]["charlm-optimized"]["versions"]["1"]
    assert opt["parity"]["pass"] and opt["variant_report"]["max_logit_diff"] <= opt["parity"]["atol"]

    dp = make_dataplane(repo)
    try:
        assert {e.name: e.state for e in dp.admin.repository_index()} == {
            "charlm": "READY", "charlm-int8": "READY", "charlm-optimized": "READY"}
    finally:
        dp.close()

    # fp16 (for CUDA): float16 inside, the I/O contract's dtypes at the interface.
    base = os.path.join(repo, "charlm", "1", "model.onnx")
    tokens = np.array([CHARLM_VOCAB.index(c) for c in EVAL_TEXT[:512]], dtype=np.int64)
    res = make_variant("fp16", base, str(tmp_path / "fp16"), str(tmp_path / "work"), model=None,
                       train_seq_len=16, base_ref="charlm/1", text=EvalText(tokens, "test"), min_agreement=0.0,
                       threads=1)
    proto = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert {i.name: i.type.tensor_type.elem_type for i in proto.graph.input} == {
        "tokens": onnx.TensorProto.INT64, "h0": f32, "c0": f32}
    assert {o.type.tensor_type.elem_type for o in proto.graph.output} == {f32}
    assert {i.data_type for i in proto.graph.initializer if i.data_type in (f32, f16)} == {f16}
    assert res.accepted and 0 <= res.report["top1_agreement"] <= 1 and res.report["max_logit_diff"] > 0
    sess = variant_session(str(tmp_path / "fp16" / "model.onnx"), "fp16", threads=1)
    assert sess.get_modelmeta().custom_metadata_map[KEY_VARIANT] == "fp16"


@pytest.mark.parametrize("value, threshold", [(1 - 41 / 4096, 0.99), (0.99001, 0.99002), (0.9949999, 0.995),
                                              (0.995, 0.995), (1.0, 0.995), (0.5, 1.001)])
def test_agreement_display_never_reads_equal_when_refused(value, threshold):
    shown, limit = percent_pair(value, threshold)
    assert shown.endswith("%") and limit.endswith("%") and len(shown.split(".")[1]) == len(limit.split(".")[1])
    assert (float(shown[:-1]) < float(limit[:-1])) == (value < threshold)  # the strings say what the numbers do
    assert (shown == limit) == (value == threshold)
    if value == 1 - 41 / 4096:
        assert (shown, limit) == ("98.999%", "99.000%")
