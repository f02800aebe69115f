"""rnnserve.export.module.export_module on modules written here: each file is checked in onnxruntime
against its module, stateful ones also streamed step by step against the whole run."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rnnserve.contract import parse_metadata
from rnnserve.export.module import export_module
from rnnserve.export.onnx_export import ExportError
from tests.user_modules import BiClassifier, GRUTagger, LSTMRegressor, NotCausal, TimeMajor

SEQS = (1, 3, 20)  # a short gate sweep keeps these tests fast; the forecaster's export runs the default one


def _session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _torch(module, *arrays):
    with torch.no_grad():
        out = module(*(torch.from_numpy(a) for a in arrays))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _meta(path: str):
    return parse_metadata(_session(path).get_modelmeta().custom_metadata_map)


def test_gru_tagger(tmp_path):
    torch.manual_seed(0)
    m = GRUTagger().eval()
    res = export_module(m, str(tmp_path), inputs={"tokens": torch.randint(0, 30, (2, 6)), "h0": torch.zeros(1, 2, 16)},
                        outputs=["tags", "hn"], states=[("h0", "hn")], class_names=["O", "B", "I"],
                        vocab=[chr(97 + i) for i in range(30)], seq_lens=SEQS, argmax_output="tags")
    assert res.parity["pass"] and res.parity["stepwise"]
    assert os.path.exists(os.path.join(tmp_path, "parity.json"))
    meta = _meta(res.onnx_path)
    assert meta.class_names == ["O", "B", "I"] and len(meta.vocab) == 30 and not meta.is_char_model
    spec = meta.spec
    assert spec.input("tokens").shape == ("batch", "seq") and spec.input("tokens").dtype == "int64"
    assert spec.output("tags").shape == ("batch", "seq", 3) and spec.output("tags").time_axis == 1
    assert [(s.input, s.output, s.shape, s.batch_axis) for s in spec.states] == [("h0", "hn", (1, "batch", 16), 1)]

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 30, (5, 11)).astype(np.int64)
    h0 = rng.standard_normal((1, 5, 16)).astype(np.float32)
    sess = _session(res.onnx_path)
    whole = sess.run(["tags", "hn"], {"tokens": tokens, "h0": h0})
    for got, ref in zip(whole, _torch(m, tokens, h0)):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    h, steps = h0, []
    for t in range(tokens.shape[1]):
        tags, h = sess.run(["tags", "hn"], {"tokens": tokens[:, t:t + 1], "h0": h})
        steps.append(tags)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole[0], atol=1e-5)
    np.testing.assert_allclose(h, whole[1], atol=1e-5)


def test_lstm_regressor_with_layernorm(tmp_path):
    torch.manual_seed(1)
    m = LSTMRegressor().eval()
    res = export_module(m, str(tmp_path), inputs={"x": torch.randn(3, 7, 4), "h0": torch.zeros(2, 3, 10),
                                                  "c0": torch.zeros(2, 3, 10)},
                        outputs=["y", "hn", "cn"], states=[("h0", "hn"), ("c0", "cn")],
                        feature_names=["a", "b", "c", "d"], seq_lens=SEQS)
    assert res.parity["pass"]
    meta = _meta(res.onnx_path)
    assert meta.feature_names == ["a", "b", "c", "d"]
    assert meta.spec.output("y").shape == ("batch", "seq", 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 4)).astype(np.float32) * 5
    h0, c0 = (rng.standard_normal((2, 2, 10)).astype(np.float32) for _ in range(2))
    sess = _session(res.onnx_path)
    whole = sess.run(["y", "hn", "cn"], {"x": x, "h0": h0, "c0": c0})
    for got, ref in zip(whole, _torch(m, x, h0, c0)):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    state, ys = {"h0": h0, "c0": c0}, []
    for t0 in range(0, 9, 4):  # chunks of 4, 4, 1
        y, hn, cn = sess.run(["y", "hn", "cn"], {"x": x[:, t0:t0 + 4], **state})
        ys.append(y)
        state = {"h0": hn, "c0": cn}
    np.testing.assert_allclose(np.concatenate(ys, axis=1), whole[0], atol=1e-5)
    np.testing.assert_allclose(state["c0"], whole[2], atol=1e-5)


def test_bidirectional_classifier_is_stateless(tmp_path):
    torch.manual_seed(2)
    m = BiClassifier().eval()
    res = export_module(m, str(tmp_path), inputs={"tokens": torch.randint(0, 20, (2, 5))}, outputs=["label"],
                        class_names=["w", "x", "y", "z"], seq_lens=SEQS, argmax_output="label")
    assert res.parity["pass"] and res.parity["stepwise"] == []
    spec = _meta(res.onnx_path).spec
    assert not spec.streamable
    assert spec.output("label").shape == ("batch", 4) and spec.output("label").time_axis is None
    tokens = np.random.default_rng(3).integers(0, 20, (4, 13)).astype(np.int64)
    got = _session(res.onnx_path).run(["label"], {"tokens": tokens})[0]
    np.testing.assert_allclose(got, _torch(m, tokens)[0], atol=1e-5)


def test_time_major_module(tmp_path):
    torch.manual_seed(3)
    m = TimeMajor().eval()
    res = export_module(m, str(tmp_path), inputs={"x": torch.randn(6, 2, 3), "h": torch.zeros(1, 2, 5)},
                        outputs=["y", "hn"], states=[("h", "hn")], batch_axes={"x": 1}, time_axes={"x": 0},
                        seq_lens=SEQS)
    assert res.parity["pass"] and res.parity["stepwise"]
    spec = _meta(res.onnx_path).spec
    assert spec.input("x").shape == ("seq", "batch", 3)
    y = spec.output("y")
    assert (y.shape, y.batch_axis, y.time_axis) == (("seq", "batch", 2), 1, 0)  # found by probing the module
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3, 3)).astype(np.float32)
    h = rng.standard_normal((1, 3, 5)).astype(np.float32)
    sess = _session(res.onnx_path)
    whole = sess.run(["y", "hn"], {"x": x, "h": h})
    for got, ref in zip(whole, _torch(m, x, h)):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    ys = []
    for t in range(8):
        yt, h = sess.run(["y", "hn"], {"x": x[t:t + 1], "h": h})
        ys.append(yt)
    np.testing.assert_allclose(np.concatenate(ys, axis=0), whole[0], atol=1e-5)


def test_gate_refuses_a_module_that_does_not_stream(tmp_path):
    torch.manual_seed(4)
    with pytest.raises(ExportError, match="parity gate failed"):
        export_module(NotCausal().eval(), str(tmp_path), inputs={"x": torch.randn(2, 5, 2), "h0": torch.zeros(1, 2, 4)},
                      outputs=["y", "hn"], states=[("h0", "hn")], seq_lens=SEQS)
    assert not os.path.exists(os.path.join(tmp_path, "model.onnx"))
    assert os.path.exists(os.path.join(tmp_path, "parity.failed.json"))


def test_bad_declarations_are_clear(tmp_path):
    with pytest.raises(ExportError, match="not among the inputs"):
        export_module(GRUTagger(), str(tmp_path), inputs={"tokens": torch.randint(0, 30, (2, 6))},
                      outputs=["tags", "hn"], states=[("h0", "hn")])
    with pytest.raises(ExportError, match="returned 1 tensors"):
        export_module(BiClassifier(), str(tmp_path), inputs={"tokens": torch.randint(0, 20, (2, 6))},
                      outputs=["label", "extra"])
    with pytest.raises(ExportError, match="are its batch and time axes declared"):  # time-major, undeclared
        export_module(TimeMajor(), str(tmp_path), inputs={"x": torch.randn(6, 2, 3), "h": torch.zeros(1, 2, 5)},
                      outputs=["y", "hn"], states=[("h", "hn")])
