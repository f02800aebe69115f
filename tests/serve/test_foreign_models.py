"""Recurrent ONNX models that rnnserve did not export (tests/foreign_models.py), served from a
repository with a config.pbtxt and without one, checked through tritonclient against
onnxruntime running the same file with the state carried by the test."""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from rnnserve.serve.admin.describe import describe, graph_tensors
from rnnserve.serve.engine.batching import Batcher
from rnnserve.serve.engine.modelio import ModelIO, Work
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.batching_models import GatedRun
from tests.fixtures import make_dataplane, serving
from tests.foreign_models import CHUNK, CONFIGS, FEATURES_SPEC, F, Reference, build, publish, with_metadata

# name -> (state pairs, has a time axis); served as `name` (no config.pbtxt) and `name_cfg`
MODELS = {
    "features": ((("hidden_in", "hidden_out"),), True),
    "chunk": ((("state", "stateN"),), False),
    "fixed": ((("h", "hn"),), True),
    "two": ((("h_prev", "h_next"), ("c", "new_c")), True),
}
SERVED = [n for name in MODELS for n in (name, f"{name}_cfg")] + ["features_meta"]   # _meta: format-2 metadata
LIMITED = "limited"      # features with a config.pbtxt that only sets max_batch_size 2


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("foreign"))
    paths = build(root)
    repo = os.path.join(root, "repo")
    for name, path in paths.items():
        publish(repo, name, path)
        publish(repo, f"{name}_cfg", path, CONFIGS[name])
    publish(repo, LIMITED, paths["features"], "max_batch_size: 2\n")
    publish(repo, "badcfg", paths["features"], "max_batch_size: [\n")
    publish(repo, "reloadable", paths["features"], "max_batch_size: 3\n")
    publish(repo, "features_meta", with_metadata(paths["features"], os.path.join(root, "meta.onnx"), FEATURES_SPEC))
    refs = {name: Reference(path, name) for name, path in paths.items()}
    with serving(repo, model_control_mode="explicit") as (server, address):
        client = tc.InferenceServerClient(address)
        try:
            yield SimpleNamespace(address=address, client=client, refs=refs, server=server, repo=repo)
        finally:
            client.close()


def base(model: str) -> str:
    return "features" if model in (LIMITED, "features_meta") else model.removesuffix("_cfg")


def step_inputs(model: str, rng, rows: int = 1, steps: int = 3, sr: int = 16000) -> dict[str, np.ndarray]:
    if base(model) == "chunk":
        return {"input": rng.standard_normal((rows, CHUNK)).astype(np.float32), "sr": np.array(sr, np.int64)}
    name = "features" if base(model) == "features" else "x"
    return {name: rng.standard_normal((rows, steps, F)).astype(np.float32)}


def infer(client, model: str, feeds: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    inputs = []
    for name, value in feeds.items():
        t = tc.InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64")
        t.set_data_from_numpy(value)
        inputs.append(t)
    result = client.infer(model, inputs, **kwargs)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response(as_json=True)["outputs"]}


def zero_states(ref: Reference, rows: int) -> dict[str, np.ndarray]:
    """Each state's only dynamic dim is its batch axis."""
    shapes = {i.name: i.shape for i in ref.sess.get_inputs()}
    return {name: np.zeros([d if isinstance(d, int) else rows for d in shapes[name]], np.float32)
            for name, _ in MODELS[ref.name][0]}


def stream(foreign, model: str, seq_id: int, chunks: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    client = tc.InferenceServerClient(foreign.address)
    try:
        return [infer(client, model, c, sequence_id=seq_id, sequence_start=i == 0,
                      sequence_end=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    finally:
        client.close()


@pytest.mark.parametrize("model", SERVED)
def test_concurrent_sequences_equal_an_onnxruntime_loop(foreign, model):
    """Three sequences streamed in chunks at once (sharing runs where the model batches) give what
    onnxruntime gives when the test carries the state itself; a causal model's chunks give the
    whole run."""
    ref = foreign.refs[base(model)]
    pairs, timed = MODELS[base(model)]
    rng = np.random.default_rng(len(model))
    seqs = []
    for k in range(3):
        sr = 8000 if k == 2 else 16000       # the chunk model's unbatched input differs between sequences
        seqs.append([step_inputs(model, rng, steps=int(rng.integers(1, 5)), sr=sr) for _ in range(6)])
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, stream(foreign, model, 100 + k, seqs[k])))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    out_name = next(o for o in ref.outputs if o not in {p[1] for p in pairs})
    for k, chunks in enumerate(seqs):
        state = zero_states(ref, 1)
        for chunk, got in zip(chunks, results[k]):
            want = ref.run({**chunk, **state})
            state = {i: want[o] for i, o in pairs}
            for name, value in want.items():
                np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=f"{model} {name}")
        if timed:   # causal over time: the chunks together are the whole run
            key = next(iter(chunks[0]))
            whole = ref.run({key: np.concatenate([c[key] for c in chunks], axis=1), **zero_states(ref, 1)})
            got = np.concatenate([r[out_name] for r in results[k]], axis=1)
            np.testing.assert_allclose(got, whole[out_name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", ["features", "chunk", "two", LIMITED])
def test_batched_answers_equal_each_request_alone(foreign, model):
    ref = foreign.refs[base(model)]
    pairs, _ = MODELS[base(model)]
    rng = np.random.default_rng(7)
    requests = []
    for i in range(24):
        rows = int(rng.integers(1, 3))
        feeds = step_inputs(model, rng, rows=rows, steps=4, sr=16000 if i % 3 else 8000)
        for name, value in zero_states(ref, rows).items():
            feeds[name] = rng.standard_normal(value.shape).astype(np.float32)
        requests.append(feeds)
    done, answers = threading.Semaphore(0), {}

    def callback(i, result, error):
        answers[i] = error if error is not None else {o: result.as_numpy(o) for o in ref.outputs}
        done.release()

    # All in the queue before any runs (a busy machine could otherwise run each as it arrives).
    batcher = foreign.server.dataplane.engine(model).batcher
    batcher.hold()
    try:
        for i, feeds in enumerate(requests):
            inputs = []
            for name, value in feeds.items():
                t = tc.InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64")
                t.set_data_from_numpy(value)
                inputs.append(t)
            foreign.client.async_infer(model, inputs, callback=functools.partial(callback, i))
        until = time.monotonic() + 60
        while batcher.queue_depth() < len(requests) and time.monotonic() < until:
            time.sleep(0.01)
    finally:
        batcher.release()
    for _ in requests:
        assert done.acquire(timeout=60)
    for i, feeds in enumerate(requests):
        assert not isinstance(answers[i], Exception), answers[i]
        want = ref.run(feeds)
        for name, value in want.items():
            np.testing.assert_allclose(answers[i][name], value, rtol=0, atol=1e-6, err_msg=f"{model} {name}")
    sizes = [b.batch_size for b in foreign.client.get_inference_statistics(model).model_stats[0].batch_stats]
    assert max(sizes) > 1, "no run was shared"        # the server did batch across requests
    if model == LIMITED:
        assert max(sizes) <= 2                          # config.pbtxt max_batch_size: 2 is in force


def test_fixed_batch_serves_sequences_but_never_batches(foreign):
    rng = np.random.default_rng(3)
    threads = [threading.Thread(target=stream, args=(foreign, "fixed", 200 + k,
                                                     [step_inputs("fixed", rng) for _ in range(4)]))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stats = foreign.client.get_inference_statistics("fixed").model_stats[0]
    assert stats.execution_count > 0 and {b.batch_size for b in stats.batch_stats} == {1}
    with pytest.raises(InferenceServerException, match="dim 0 must be 1") as err:
        infer(foreign.client, "fixed", {"x": np.zeros((2, 3, F), np.float32)})
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def invalid(client, model, feeds, *fragments):
    with pytest.raises(InferenceServerException) as err:
        infer(client, model, feeds)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
    for fragment in fragments:
        assert fragment in err.value.message()


def test_validation_follows_the_declared_io(foreign):
    c = foreign.client
    nan = np.zeros((1, 2, F), np.float32)
    nan[0, 1, 2] = np.nan
    invalid(c, "features", {"features": nan}, "input 'features' contains NaN or Inf", "allow_nonfinite")
    want = foreign.refs["features"].run({"features": nan, "hidden_in": np.zeros((1, 1, 8), np.float32)})
    np.testing.assert_array_equal(infer(c, "features_cfg", {"features": nan})["y"], want["y"])   # allow_nonfinite
    invalid(c, "features", {"features": np.zeros((1, 2, 4), np.float32)}, "dim 2 must be 3")
    invalid(c, "features", {"features": np.zeros((1, 0, F), np.float32)}, "must be >= 1")
    invalid(c, "features", {"features": np.zeros((2, F), np.float32)}, "must have rank 3")
    invalid(c, "features", {"features": np.zeros((1, 65, F), np.float32)}, "over the server's maximum of 64")
    invalid(c, "features", {"features": np.zeros((2, 2, F), np.float32), "hidden_in": np.zeros((1, 3, 8), np.float32)},
            "state input 'hidden_in' has shape [1, 3, 8], expected [1, 2, 8]")
    invalid(c, "chunk", {"input": np.zeros((1, CHUNK), np.float32)}, "missing input 'sr'")
    invalid(c, "chunk", {"input": np.zeros((1, CHUNK), np.float32), "sr": np.array([16000], np.int64)},
            "'sr' must have rank 0")


def test_metadata_config_index_and_text_api(foreign):
    c = foreign.client
    meta = c.get_model_metadata("chunk")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 64]), ("state", "FP32", [2, -1, 128]), ("sr", "INT64", []),
        ("sequence_id", "UINT64", [-1]), ("sequence_start", "BOOL", [-1]), ("sequence_end", "BOOL", [-1])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("output", [-1, 1]), ("stateN", [2, -1, 128])]
    cfg = c.get_model_config("features_cfg").config
    assert [s.input_name for s in cfg.sequence_batching.state] == ["hidden_in"]
    assert cfg.sequence_batching.max_sequence_idle_microseconds == 5_000_000
    assert cfg.sequence_batching.oldest.max_queue_delay_microseconds == 100
    assert [g.count for g in cfg.instance_group] == [2]
    assert cfg.parameters["allow_nonfinite"].string_value == "true"
    assert cfg.parameters["io_source"].string_value == "config.pbtxt"
    assert c.get_model_config("features_meta").config.parameters["io_source"].string_value == "metadata"
    assert c.get_model_config("chunk").config.parameters["io_source"].string_value == "graph"
    limited = c.get_model_config(LIMITED).config
    assert list(limited.sequence_batching.oldest.preferred_batch_size) == [2]
    assert limited.parameters["max_batch_size"].string_value == "2"
    assert c.get_model_config("fixed").config.parameters["max_batch_size"].string_value == "1"
    index = {m.name: m for m in c.get_model_repository_index().models}
    assert index["badcfg"].state == "UNAVAILABLE" and "config.pbtxt does not parse" in index["badcfg"].reason
    assert all(index[n].state == "READY" for n in SERVED + [LIMITED])
    with grpc.insecure_channel(foreign.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            tpb_grpc.TextServiceStub(ch).Predict(tpb.PredictRequest(model="features", text="abc"), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'features' has no vocabulary" in err.value.details()


def test_load_logs_what_was_inferred_and_what_is_ignored(foreign, caplog):
    caplog.set_level(logging.INFO, logger="rnnserve.serve.admin")
    make_dataplane(foreign.repo, warmup=False).close()
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if "not supported" in m] == [
        "model features_cfg: config.pbtxt fields not supported by rnnserve, ignored: model_warmup"]
    ready = [m for m in lines if m.startswith("model chunk version 1 READY")]
    assert len(ready) == 1 and "I/O from graph" in ready[0] and "sr INT64 [] (unbatched)" in ready[0]
    assert "state->stateN FP32 [2, 'batch', 128] (batch axis 1)" in ready[0]


def test_a_changed_config_takes_effect_on_reload(foreign):
    c = foreign.client
    assert c.get_model_config("reloadable").config.parameters["max_batch_size"].string_value == "3"
    with open(os.path.join(foreign.repo, "reloadable", "config.pbtxt"), "w") as f:
        f.write("max_batch_size: 5\ninstance_group [ { count: 2 } ]\n")
    c.load_model("reloadable")
    cfg = c.get_model_config("reloadable").config
    assert cfg.parameters["max_batch_size"].string_value == "5" and [g.count for g in cfg.instance_group] == [2]


def test_unbatched_inputs_share_a_run_only_when_equal(foreign):
    """The chunk model's rank-0 `sr`: queued work with equal values shares a run, other values do not."""
    ref = foreign.refs["chunk"]
    spec = describe(graph_tensors(ref.sess.get_inputs()), graph_tensors(ref.sess.get_outputs()), None, None).spec
    gated, runs = GatedRun(ref), []

    def run(feeds):
        runs.append((int(feeds["sr"]), feeds["input"].shape[0]))
        return gated(feeds)

    rng = np.random.default_rng(5)
    b = Batcher("chunk", run, ModelIO.from_spec(spec), max_batch_size=16)
    try:
        b.submit(Work(step_inputs("chunk", rng), (zero_states(ref, 1)["state"],)))   # held at the gate
        assert gated.entered.wait(30)
        works = [Work(step_inputs("chunk", rng, sr=sr), (rng.standard_normal((2, 1, 128)).astype(np.float32),))
                 for sr in (16000, 8000, 16000, 8000, 16000)]
        for w in works:
            b.submit(w)
        gated.gate.set()
        answers = [w.future.result(timeout=30) for w in works]
    finally:
        b.close()
    assert runs[1:] == [(16000, 3), (8000, 2)]
    for w, got in zip(works, answers):
        want = ref.run({**w.inputs, "state": w.states[0]})
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6)
