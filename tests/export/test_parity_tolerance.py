"""The parity gate's tolerance |d| <= atol + rtol*|ref|: it scales with the outputs and still catches small changes.

Real exports and real onnxruntime sessions; random weights (the tolerance is about float32
rounding, which does not need a trained model).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.parity import format_cases, format_summary, run_parity
from rnnserve.export.tolerance import ATOL, RTOL, Tolerance, argmax_check, compare_arrays, compare_outputs
from rnnserve.train.checkpoint import save_checkpoint
from rnnserve.train.model import CharRNN, ModelConfig

SMALL = ModelConfig(arch="lstm", vocab_size=12, emb_size=8, hidden_size=32, num_layers=2)


def _checkpoint(root, name: str, cfg: ModelConfig, head_scale: float = 1.0, seq_len: int = 16):
    torch.manual_seed(0)
    model = CharRNN(cfg).eval()
    with torch.no_grad():
        model.fc.weight.mul_(head_scale)
        model.fc.bias.mul_(head_scale)
    path = str(root / name / "checkpoint.pt")
    vocab = [chr(97 + i) for i in range(cfg.vocab_size)]
    save_checkpoint(path, model, vocab, {"task": "random", "seq_len": seq_len}, {})
    return model, path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("tol")
    model, path = _checkpoint(root, "small", SMALL)
    return model, export_checkpoint(path, str(root / "small" / "out"), threads=1)


def test_compare_arrays_is_allclose_and_names_the_worst_element():
    tol = Tolerance(atol=1e-4, rtol=1e-3)
    ref = np.array([0.0, 100.0, -200.0, 1.0], np.float32)
    got = ref + np.array([5e-5, 0.09, -0.15, 0.0], np.float32)
    res = compare_arrays(ref, got, tol)
    assert res["pass"] == bool(np.allclose(got, ref, rtol=1e-3, atol=1e-4))
    # limits: 1e-4, 0.1001, 0.2001, 0.0011 -> ratios 0.5, ~0.9, ~0.75, 0: the worst is the element at 100
    assert res["worst_ref"] == 100.0 and res["ratio"] == pytest.approx(0.09 / 0.1001, rel=1e-3)
    assert res["max_abs_diff"] == pytest.approx(0.15, rel=1e-4)
    assert res["max_rel_diff"] == pytest.approx(0.09 / 100, rel=1e-3)  # the 0.0 element has no ratio
    bad = compare_arrays(ref, ref + np.float32(0.2), tol)
    assert not bad["pass"] and bad["worst_ref"] == 0.0 and bad["ratio"] > 1
    with pytest.raises(ValueError, match="non-finite"):
        compare_arrays(ref, np.array([np.nan, 0, 0, 0], np.float32), tol)
    zero = compare_arrays(ref, ref + np.float32(1e-7), Tolerance(0, 0))
    assert not zero["pass"] and zero["ratio"] is None  # strict JSON: no Infinity


def test_argmax_rule_for_class_scores_only():
    tol = Tolerance(atol=1e-4, rtol=1e-3)
    ref = np.array([[[10.0, 9.995, 0.0], [1.0, 3.0, 2.0]]], np.float32)
    flipped_tie = ref[:, :, [1, 0, 2]]
    flipped_tie[0, 1] = ref[0, 1]
    assert argmax_check(ref, flipped_tie, tol) == {"argmax_mismatches": 0, "argmax_near_ties": 1}
    far = ref.copy()
    far[0, 1] = [3.0, 1.0, 2.0]
    assert argmax_check(ref, far, tol)["argmax_mismatches"] == 1
    # A forecaster's float outputs: no argmax rule unless asked for.
    out = compare_outputs(["y"], [far], [far + 1e-6], tol)
    assert out["pass"] and "argmax_mismatches" not in out and out["worst_output"] == "y"


def test_report_has_per_case_abs_rel_and_worst_reference(small, capsys):
    report = small[1].parity
    assert report["pass"] and report["tolerance"]["atol"] == ATOL and report["tolerance"]["rtol"] == RTOL
    for case in report["cases"] + report["stepwise"]:
        assert case["pass"] and 0 <= case["ratio"] <= 1
        assert set(case["outputs"]) == {"logits", "hn", "cn"}
        for stats in case["outputs"].values():
            assert {"max_abs_diff", "max_rel_diff", "worst_ref", "worst_diff", "ratio"} <= set(stats)
        assert case["max_abs_diff"] == max(s["max_abs_diff"] for s in case["outputs"].values())
    worst = report["worst"]
    assert worst["ratio"] == max(c["ratio"] for c in report["cases"] + report["stepwise"])
    summary = format_summary(report)
    assert "max rel diff" in summary and f"at ref {worst['ref']:.3g}" in summary and "PASS" in summary
    table = format_cases(report).splitlines()
    assert "worst ref" in table[0] and len(table) == 1 + len(report["cases"]) + len(report["stepwise"])


def test_one_output_weight_moved_by_1e_3_fails(small, tmp_path):
    model, res = small
    proto = onnx.load(res.onnx_path)
    inits = {i.name: i for i in proto.graph.initializer}
    name = next(n for n in proto.graph.node if n.op_type == "MatMul").input[1]   # the output layer's weight
    arr = numpy_helper.to_array(inits[name]).copy()
    arr.flat[0] += 1e-3
    inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    path = str(tmp_path / "moved.onnx")
    onnx.save(proto, path)
    report = run_parity(model, path, train_seq_len=16, batches=(1, 3), seq_lens=(1, 7, 64), threads=1)
    assert not report["pass"], format_summary(report)
    assert report["worst"]["output"] == "logits" and report["worst"]["ratio"] > 1
    assert report["max_abs_diff"] < 1e-3  # a small change, and still caught


def test_outputs_in_the_hundreds_pass(tmp_path):
    model, path = _checkpoint(tmp_path, "big", SMALL, head_scale=1000.0)
    onnx_path = export_checkpoint(path, str(tmp_path / "out"), gate=False, threads=1).onnx_path
    report = run_parity(model, onnx_path, train_seq_len=16, batches=(1, 16), seq_lens=(1, 64, 1000), threads=1)
    assert report["pass"], format_summary(report)
    with torch.no_grad():
        logits = model(torch.randint(0, SMALL.vocab_size, (4, 64)))[0]
    assert float(logits.abs().max()) > 100  # the outputs really are in the hundreds


def test_lstm_2x1024_passes(tmp_path):
    cfg = ModelConfig(arch="lstm", vocab_size=16, emb_size=16, hidden_size=1024, num_layers=2)
    model, path = _checkpoint(tmp_path, "wide", cfg, seq_len=32)
    onnx_path = export_checkpoint(path, str(tmp_path / "out"), gate=False, threads=1).onnx_path
    # A reduced grid keeps the suite fast; the rounding grows with width, which this covers.
    report = run_parity(model, onnx_path, train_seq_len=32, batches=(1, 3), seq_lens=(1, 7, 64), threads=1)
    assert report["pass"], format_summary(report)
    assert len(report["stepwise"]) == 2
