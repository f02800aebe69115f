"""The data plane over real repositories: exact outputs, text API, versions, failures,
statistics, repository control. Reference values come from a separate in-process
onnxruntime session on the same file (and, for scoring, from the PyTorch checkpoint)."""
from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from rnnserve.serve.dataplane.plane import DataPlane
from rnnserve.serve.engine.runtime import DeviceError
from rnnserve.serve.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from rnnserve.serve.settings import ServeSettings
from rnnserve.serve.wire.types import InferRequest
from rnnserve.train.checkpoint import load_checkpoint
from rnnserve.train.model import PRESET_NAMES
from tests.fixtures import copy_repo, make_dataplane

CHARLM_MODELS = ["charlm", "chargru", "bigru"]


def reference(path: str, feeds: dict) -> dict:
    """An independent onnxruntime run of the same file (zero state where feeds have none)."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    batch = feeds["tokens"].shape[0]
    feeds = dict(feeds)
    for i in sess.get_inputs():
        if i.name not in feeds:
            feeds[i.name] = np.zeros([d if isinstance(d, int) else batch for d in i.shape], np.float32)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def model_path(repo: str, name: str, version: str = "1") -> str:
    return os.path.join(repo, name, version, "model.onnx")


def random_feeds(inst, rng, batch=3, seq=7, with_state=True):
    feeds = {"tokens": rng.integers(0, inst.vocab_size, (batch, seq)).astype(np.int64)}
    if with_state:
        for name in inst.state_inputs:
            feeds[name] = rng.standard_normal(inst.state_shape(batch)).astype(np.float32)
    return feeds


def runs(engine) -> int:
    """onnxruntime runs of the engine's model version so far (its execution_count)."""
    return engine.counters.snapshot().execution_count


def infer(dp, model, inputs, version="", **kw):
    return dp.infer(InferRequest(model_name=model, model_version=version, inputs=inputs, **kw))


# -- tensors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_hello_infer_bit_identical(hello_dataplane, hello_repo, name):
    rng = np.random.default_rng(0)
    feeds = random_feeds(hello_dataplane.engine(name).inst, rng)
    resp = infer(hello_dataplane, name, feeds)
    ref = reference(model_path(hello_repo, name), feeds)
    assert [n for n, _ in resp.outputs] == list(ref)
    for n, value in resp.outputs:
        assert value.dtype == ref[n].dtype and np.array_equal(value, ref[n]), n
    assert (resp.model_name, resp.model_version) == (name, "1")


@pytest.mark.parametrize("name", CHARLM_MODELS)
def test_charlm_infer_bit_identical(charlm_dataplane, charlm_repo, name):
    inst = charlm_dataplane.engine(name).inst
    feeds = random_feeds(inst, np.random.default_rng(1), batch=2, seq=33)
    resp = infer(charlm_dataplane, name, feeds, id="req-7")
    ref = reference(model_path(charlm_repo, name, inst.version), feeds)
    assert resp.id == "req-7"
    assert all(np.array_equal(v, ref[n]) for n, v in resp.outputs)


@pytest.mark.parametrize("name", ["emb-lstm", "emb-gru", "rnncell"])
def test_omitted_state_is_zero_state(hello_dataplane, name):
    inst = hello_dataplane.engine(name).inst
    feeds = random_feeds(inst, np.random.default_rng(2), batch=2, seq=5, with_state=False)
    zeros = {n: np.zeros(inst.state_shape(2), np.float32) for n in inst.state_inputs}
    a = infer(hello_dataplane, name, feeds).outputs
    b = infer(hello_dataplane, name, feeds | zeros).outputs
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    # Only some state given: the rest is zeros.
    c = infer(hello_dataplane, name, feeds | {inst.state_inputs[0]: zeros[inst.state_inputs[0]]}).outputs
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, c))


def test_requested_outputs_in_requested_order(hello_dataplane):
    feeds = {"tokens": np.array([[1, 0, 2, 2, 3]], np.int64)}
    full = dict(infer(hello_dataplane, "emb-lstm", feeds).outputs)
    resp = infer(hello_dataplane, "emb-lstm", feeds, requested_outputs=["cn", "logits"])
    assert [n for n, _ in resp.outputs] == ["cn", "logits"]
    assert all(np.array_equal(v, full[n]) for n, v in resp.outputs)


def test_state_carries_across_calls(charlm_dataplane, charlm_repo):
    """Feeding hn/cn back as h0/c0 equals one run over the whole sequence (the basis of issue 4)."""
    rng = np.random.default_rng(3)
    toks = rng.integers(0, 32, (2, 20)).astype(np.int64)
    whole = dict(infer(charlm_dataplane, "charlm", {"tokens": toks}).outputs)
    first = dict(infer(charlm_dataplane, "charlm", {"tokens": toks[:, :7]}).outputs)
    second = dict(infer(charlm_dataplane, "charlm", {"tokens": toks[:, 7:], "h0": first["hn"],
                                                     "c0": first["cn"]}).outputs)
    np.testing.assert_allclose(second["logits"], whole["logits"][:, 7:], atol=1e-5)
    np.testing.assert_allclose(second["cn"], whole["cn"], atol=1e-5)


def test_deadline_and_cancel_checked_before_running(hello_dataplane):
    engine = hello_dataplane.engine("emb-gru")
    before = runs(engine)
    feeds = {"tokens": np.zeros((1, 3), np.int64)}
    with pytest.raises(DeadlineExceeded):
        infer(hello_dataplane, "emb-gru", feeds, deadline=time.monotonic() - 0.001)
    with pytest.raises(Cancelled):
        infer(hello_dataplane, "emb-gru", feeds, is_cancelled=lambda: True)
    assert runs(engine) == before
    infer(hello_dataplane, "emb-gru", feeds, deadline=time.monotonic() + 60, is_cancelled=lambda: False)
    assert runs(engine) == before + 1


# -- text ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_predict_hello(hello_dataplane, hello_built, name):
    result = hello_dataplane.predict_text(name, "hello", top_k=4)
    assert result.decoded == "ohlol" == hello_built.predicted[name]
    assert [p.input_char for p in result.positions] == list("hello")
    for p in result.positions:
        probs = [c.prob for c in p.top]
        assert p.top[0].char == p.char and p.top[0].prob == p.prob
        assert probs == sorted(probs, reverse=True) and math.isclose(sum(probs), 1.0, rel_tol=1e-9)
        assert sorted(c.char for c in p.top) == list("ehlo")


def test_predict_probabilities_are_softmax(hello_dataplane, hello_repo):
    result = hello_dataplane.predict_text("emb-rnn", "hell", top_k=2)
    logits = reference(model_path(hello_repo, "emb-rnn"), {"tokens": np.array([[1, 0, 2, 2]])})["logits"][0]
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    for t, p in enumerate(result.positions):
        order = np.argsort(-probs[t], kind="stable")[:2]
        assert [c.char for c in p.top] == ["ehlo"[i] for i in order]
        np.testing.assert_allclose([c.prob for c in p.top], probs[t][order], rtol=1e-12)
    assert hello_dataplane.predict_text("emb-rnn", "hell", top_k=0).positions[0].top == []


def _greedy_by_rerunning(path, vocab, prompt, n):
    """Reference greedy decode that re-runs the whole prefix every step (O(n^2))."""
    ids = [vocab.index(c) for c in prompt]
    out = []
    for _ in range(n):
        logits = reference(path, {"tokens": np.array([ids], np.int64)})["logits"][0, -1]
        ids.append(int(np.argmax(logits)))
        out.append(vocab[ids[-1]])
    return "".join(out)


def test_generate_greedy_carries_state_in_one_run_per_token(charlm_dataplane, charlm_repo):
    engine = charlm_dataplane.engine("charlm")
    inst = engine.inst
    before = runs(engine)
    events = list(charlm_dataplane.generate("charlm", "the cat", 12, temperature=0))
    # O(1) per token: the prompt runs once, then one step per further token (the last
    # token needs no step), never re-running the prompt.
    assert runs(engine) - before == 1 + (len(events) - 1) == 12
    assert [e.index for e in events] == list(range(12))
    assert [e.finish_reason for e in events] == [""] * 11 + ["length"]
    text = "".join(e.text for e in events)
    assert all(inst.vocab[e.token_id] == e.text for e in events)
    assert text == _greedy_by_rerunning(model_path(charlm_repo, "charlm", "2"), inst.vocab, "the cat", 12)


def test_generate_is_deterministic_with_a_seed(charlm_dataplane):
    def run(seed, **kw):
        return "".join(e.text for e in charlm_dataplane.generate("charlm", "hello", 40, seed=seed, **kw))
    a, b, c = run(7), run(7), run(8)
    assert a == b and len(a) == 40 and a != c
    assert run(7, top_k=3, top_p=0.9, temperature=0.7) == run(7, top_k=3, top_p=0.9, temperature=0.7)


def test_generate_top_k_1_and_tiny_top_p_are_greedy(charlm_dataplane):
    greedy = "".join(e.text for e in charlm_dataplane.generate("chargru", "abc", 20, temperature=0))
    for kw in (dict(top_k=1), dict(top_p=1e-9)):
        got = "".join(e.text for e in charlm_dataplane.generate("chargru", "abc", 20, temperature=1.5, seed=1, **kw))
        assert got == greedy, kw


def test_generate_stops_at_stop_string(charlm_dataplane):
    greedy = "".join(e.text for e in charlm_dataplane.generate("charlm", "abc", 30, temperature=0))
    stop = greedy[5:7]
    end = next(i for i in range(2, 31) if greedy[:i].endswith(stop))
    engine = charlm_dataplane.engine("charlm")
    before = runs(engine)
    events = list(charlm_dataplane.generate("charlm", "abc", 30, temperature=0, stop=["never!", stop]))
    assert "".join(e.text for e in events) == greedy[:end]
    assert events[-1].finish_reason == "stop" and all(e.finish_reason == "" for e in events[:-1])
    assert runs(engine) - before == len(events)


def test_generate_version_and_abandoned_stream(charlm_dataplane):
    engine1 = charlm_dataplane.engine("charlm", "1")
    before = runs(engine1)
    stream = charlm_dataplane.generate("charlm", "ab", 30, temperature=0, version="1")
    assert runs(engine1) == before            # nothing runs until the first token is asked for
    first = [next(stream) for _ in range(3)]
    stream.close()                            # the client went away: no more runs
    assert runs(engine1) - before == 3 and [e.index for e in first] == [0, 1, 2]


@pytest.mark.parametrize("name, version", [("charlm", "2"), ("charlm", "1"), ("chargru", "1")])
def test_score_matches_hand_computation(charlm_dataplane, charlm_repo, charlm_built, name, version):
    text = "the quick brown fox."
    inst = charlm_dataplane.engine(name, version).inst
    ids = [inst.vocab.index(c) for c in text]
    result = charlm_dataplane.score(name, text, version=version)
    # by hand, from an independent onnxruntime run: sum_t log softmax(logits[t])[ids[t+1]]
    logits = reference(model_path(charlm_repo, name, version), {"tokens": np.array([ids])})["logits"][0]
    ll = 0.0
    for t in range(len(ids) - 1):
        row = logits[t].astype(np.float64)
        ll += row[ids[t + 1]] - (row.max() + math.log(np.exp(row - row.max()).sum()))
    n = len(text) - 1
    assert result.num_predicted == n and (result.model_name, result.model_version) == (name, version)
    assert math.isclose(result.log_likelihood, ll, rel_tol=1e-12)
    assert math.isclose(result.nats_per_char, -ll / n, rel_tol=1e-12)
    assert math.isclose(result.bits_per_char, -ll / n / math.log(2), rel_tol=1e-12)
    # and from the PyTorch checkpoint the model came from
    model, _ = load_checkpoint(charlm_built.checkpoints[f"{name}/{version}"])
    with torch.no_grad():
        torch_logits, _ = model(torch.tensor([ids]))
    nll = F.cross_entropy(torch_logits[0, :-1].double(), torch.tensor(ids[1:]), reduction="sum").item()
    assert math.isclose(result.log_likelihood, -nll, rel_tol=1e-5)


# -- metadata, config, versions ---------------------------------------------------------------------
def test_server_and_model_metadata(charlm_dataplane):
    meta = charlm_dataplane.server_metadata()
    assert meta.name == "rnnserve" and "onnxruntime_provider:CPUExecutionProvider" in meta.extensions
    assert charlm_dataplane.providers() == ["CPUExecutionProvider"]
    m = charlm_dataplane.model_metadata("charlm")
    assert (m.name, m.versions, m.platform) == ("charlm", ["1", "2"], "onnxruntime_onnx")
    assert [(s.name, s.datatype, s.shape) for s in m.inputs] == [
        ("tokens", "INT64", [-1, -1]), ("h0", "FP32", [2, -1, 16]), ("c0", "FP32", [2, -1, 16]),
        ("sequence_id", "UINT64", [-1]), ("sequence_start", "BOOL", [-1]), ("sequence_end", "BOOL", [-1])]
    assert [(s.name, s.datatype, s.shape) for s in m.outputs] == [
        ("logits", "FP32", [-1, -1, 32]), ("hn", "FP32", [2, -1, 16]), ("cn", "FP32", [2, -1, 16])]
    assert m.parameters["providers"] == "CPUExecutionProvider" and m.parameters["version"] == "2"
    assert m.parameters["arch"] == "lstm" and m.parameters["streamable"] == "true"
    assert charlm_dataplane.model_metadata("charlm", "1").parameters["version"] == "1"
    bi = charlm_dataplane.model_metadata("bigru")
    assert [s.name for s in bi.inputs] == ["tokens"] and bi.parameters["bidirectional"] == "true"


def test_model_config_full_shapes(charlm_dataplane):
    cfg = charlm_dataplane.model_config("charlm")
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("charlm", "onnxruntime_onnx", 0)
    assert [s.shape for s in cfg.inputs] == [[-1, -1], [2, -1, 16], [2, -1, 16], [-1], [-1], [-1]]
    assert [s.shape for s in cfg.outputs] == [[-1, -1, 32], [2, -1, 16], [2, -1, 16]]


def test_versions_are_addressable(charlm_dataplane, charlm_repo):
    feeds = {"tokens": np.array([[1, 2, 3, 4]], np.int64)}
    default = infer(charlm_dataplane, "charlm", feeds)
    v1 = infer(charlm_dataplane, "charlm", feeds, version="1")
    v2 = infer(charlm_dataplane, "charlm", feeds, version="2")
    assert (default.model_version, v1.model_version, v2.model_version) == ("2", "1", "2")
    assert np.array_equal(default.outputs[0][1], v2.outputs[0][1])
    assert not np.array_equal(v1.outputs[0][1], v2.outputs[0][1])
    for version, resp in (("1", v1), ("2", v2)):
        expected = reference(model_path(charlm_repo, "charlm", version), feeds)["logits"]
        assert np.array_equal(resp.outputs[0][1], expected)
    assert charlm_dataplane.model_ready("charlm", "1") and charlm_dataplane.model_ready("charlm")
    with pytest.raises(NotFound, match="model 'charlm' has no version '3'; versions: 1, 2"):
        charlm_dataplane.model_ready("charlm", "3")
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        charlm_dataplane.model_metadata("nope")


# -- failures, repository control, statistics ------------------------------------------------------
def _break_metadata(src: str, dst: str) -> None:
    proto = onnx.load(src)
    for prop in proto.metadata_props:
        if prop.key == "rnnserve.vocab":
            prop.value = "[not json"
    os.makedirs(os.path.dirname(dst))
    onnx.save(proto, dst)


def test_broken_models_are_unavailable_and_the_rest_serve(hello_repo, tmp_path):
    repo = copy_repo(hello_repo, str(tmp_path / "repo"))
    os.makedirs(tmp_path / "repo" / "corrupt" / "1")
    (tmp_path / "repo" / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    _break_metadata(model_path(repo, "emb-gru"), model_path(repo, "badmeta"))
    os.makedirs(tmp_path / "repo" / "noversion" / "latest")
    os.makedirs(tmp_path / "repo" / "nofile" / "1")
    dp = make_dataplane(repo, warmup=False)
    try:
        index = {(e.name, e.version): e for e in dp.admin.repository_index()}
        assert dp.server_ready()
        for key, fragment in ((("corrupt", "1"), "failed to load"), (("badmeta", "1"), "rnnserve.vocab"),
                              (("noversion", ""), "no version folder"), (("nofile", "1"), "missing model.onnx")):
            assert index[key].state == "UNAVAILABLE" and fragment in index[key].reason, index[key]
        assert not dp.model_ready("corrupt")
        with pytest.raises(Unavailable, match="model 'corrupt' version 1 is UNAVAILABLE"):
            dp.predict_text("corrupt", "hello")
        for name in PRESET_NAMES:
            assert index[(name, "1")].state == "READY" and dp.predict_text(name, "hello").decoded == "ohlol"
    finally:
        dp.close()


def test_load_and_unload(hello_repo, tmp_path):
    repo = copy_repo(hello_repo, str(tmp_path / "repo"))
    dp = make_dataplane(repo, warmup=False, model_control_mode="explicit")
    try:
        dp.admin.unload_model("rnn")
        assert not dp.model_ready("rnn")
        assert {(e.name, e.state) for e in dp.admin.repository_index()} >= {("rnn", "UNLOADED"), ("emb-rnn", "READY")}
        with pytest.raises(Unavailable, match="UNLOADED"):
            dp.predict_text("rnn", "hello")
        # a new version appears on disk; load_model re-scans the model
        copy_repo(os.path.join(repo, "emb-rnn", "1"), os.path.join(repo, "rnn", "2"))
        dp.admin.load_model("rnn")
        assert dp.model_metadata("rnn").versions == ["1", "2"]
        assert dp.model_metadata("rnn").parameters["arch"] == "rnn"
        assert dp.engine("rnn").inst.version == "2" and dp.predict_text("rnn", "hello", version="1").decoded == "ohlol"
        with pytest.raises(NotFound):
            dp.admin.load_model("nope")
        with pytest.raises(NotFound):
            dp.admin.unload_model("nope")
    finally:
        dp.close()
    assert not dp.server_ready() and not dp.server_live()


def test_statistics(charlm_repo, caplog):
    with caplog.at_level(logging.INFO, logger="rnnserve.serve.engine.runtime"):
        dp = make_dataplane(charlm_repo)
    try:
        assert any(r.getMessage().startswith("warmed up chargru version 1") for r in caplog.records)  # warmed up ...
        assert dp.model_statistics("chargru")[0].execution_count == 0  # ... without counting as traffic
        for batch in (1, 3, 3):
            infer(dp, "chargru", {"tokens": np.zeros((batch, 4), np.int64)})
        with pytest.raises(InvalidArgument):
            infer(dp, "chargru", {"tokens": np.full((1, 4), 99, np.int64)})
        dp.predict_text("chargru", "abc")
        list(dp.generate("chargru", "abc", 5, temperature=0))
        [s] = dp.model_statistics("chargru", "1")
        assert (s.name, s.version) == ("chargru", "1")
        # Triton's counts: rows served (each generate step is a row) and onnxruntime runs. Request
        # outcomes are counted by the front end (tests/serve/test_statistics.py), not here.
        assert s.inference_count == 1 + 3 + 3 + 1 + 5 and s.success.count == 0 and s.fail.count == 0
        assert s.execution_count == 3 + 1 + 5 and s.compute_infer.count == 9 and s.compute_infer.ns > 0
        assert {k: v.count for k, v in s.batch_stats.items()} == {1: 7, 3: 2}
        assert s.last_inference_ms > 0
        assert {(x.name, x.version) for x in dp.model_statistics()} == {
            ("bigru", "1"), ("chargru", "1"), ("charlm", "1"), ("charlm", "2")}
    finally:
        dp.close()


def test_lifecycle_before_load_and_device_errors(charlm_repo):
    dp = DataPlane(ServeSettings(repository=charlm_repo, device="cpu"))
    assert dp.server_live() and not dp.server_ready()
    with pytest.raises(Unavailable, match="not loaded"):
        dp.model_metadata("charlm")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DeviceError, match="--device cuda: this onnxruntime build .* has no CUDAExecutionProvider"):
            DataPlane(ServeSettings(repository=charlm_repo, device="cuda")).load()
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        DataPlane(ServeSettings(repository=charlm_repo, device="tpu")).load()
    with pytest.raises(Unavailable, match="is not a directory"):
        DataPlane(ServeSettings(repository=charlm_repo + "/nope", device="cpu")).load()


def test_auto_device_uses_what_is_really_active(charlm_repo, caplog):
    auto = DataPlane(ServeSettings(repository=charlm_repo, device="auto", warmup=False))
    with caplog.at_level(logging.INFO, logger="rnnserve.serve.engine.runtime"):
        auto.load()
    if "CUDAExecutionProvider" not in ort.get_available_providers():   # the plain CPU install: no warning
        assert "has no CUDAExecutionProvider; using CPU" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "--device" in r.getMessage()]
    try:
        expected = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
            if "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
        for name in ("charlm", "bigru"):
            assert auto.engine(name).inst.providers == auto.engine(name).inst.session.get_providers()
        assert auto.providers() in (expected, ["CPUExecutionProvider"])
    finally:
        auto.close()
