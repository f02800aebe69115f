"""Prometheus metrics over HTTP: a real server with --metrics-port 0, real clients (tritonclient,
our text stubs), scraped and parsed with prometheus_client.parser. Request counts by gRPC code
must match exactly what was sent; batch numbers must agree with ModelStatistics."""
from __future__ import annotations

import os
import queue
import threading
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.fixtures import copy_repo, serving

FAMILIES = {"rnnserve_requests", "rnnserve_request_duration_seconds", "rnnserve_inferences",
            "rnnserve_executions", "rnnserve_batch_size", "rnnserve_queue_duration_seconds",
            "rnnserve_compute_duration_seconds", "rnnserve_live_sequences", "rnnserve_queue_depth",
            "rnnserve_model_state"}


def scrape(port: int) -> dict:
    """{sample name: [(labels, value)]} from GET /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = list(text_string_to_metric_families(body))
    assert FAMILIES <= {f.name for f in families}
    out: dict = {}
    for family in families:
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def by(samples: dict, name: str, *keys: str) -> dict:
    """{label values: value} of one sample name, keyed by the given labels (summed over the rest)."""
    out: Counter = Counter()
    for labels, value in samples.get(name, []):
        out[tuple(labels[k] for k in keys)] += value
    return {k: v for k, v in out.items()}


def tokens(ids) -> tc.InferInput:
    array = np.asarray(ids, dtype=np.int64)
    t = tc.InferInput("tokens", list(array.shape), "INT64")
    t.set_data_from_numpy(array)
    return t


def code(call, *args, **kwargs) -> str:
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return exc.status().replace("StatusCode.", "")
    return "OK"


def test_metrics_count_what_was_sent(charlm_repo, tmp_path):
    repo = copy_repo(charlm_repo, str(tmp_path / "repo"))
    os.makedirs(os.path.join(repo, "broken", "1"))
    with open(os.path.join(repo, "broken", "1", "model.onnx"), "wb") as f:
        f.write(b"not an onnx file")
    with serving(repo, metrics_port=0, model_control_mode="explicit") as (server, address), \
            serving(repo, metrics_port=0) as (other, other_address), \
            grpc.insecure_channel(address) as channel:
        assert server.metrics_port not in (None, other.metrics_port)
        client = tc.InferenceServerClient(address)
        text = tpb_grpc.TextServiceStub(channel)
        first = scrape(server.metrics_port)
        assert by(first, "rnnserve_requests_total", "model") == {}
        state = by(first, "rnnserve_model_state", "model", "version", "state")
        assert state[("charlm", "2", "READY")] == 1 and state[("charlm", "2", "LOADING")] == 0
        assert state[("broken", "1", "UNAVAILABLE")] == 1 and state[("broken", "1", "READY")] == 0

        # tensor requests: successes, INVALID_ARGUMENT, NOT_FOUND (unknown model / unknown version)
        sent = [code(client.infer, "charlm", [tokens([[1, 2, 3]])], model_version="1") for _ in range(3)]
        sent += [code(client.infer, "charlm", [tokens([[4, 5]])]) for _ in range(2)]
        sent += [code(client.infer, "charlm", [tokens([[999]])]) for _ in range(2)]
        sent += [code(client.infer, "nope", [tokens([[1]])]) for _ in range(2)]
        sent += [code(client.infer, "charlm", [tokens([[1]])], model_version="9")]
        sent += [code(client.infer, "broken", [tokens([[1]])])]
        assert sent == ["OK"] * 5 + ["INVALID_ARGUMENT"] * 2 + ["NOT_FOUND"] * 3 + ["UNAVAILABLE"]
        assert code(tc.InferenceServerClient(other_address).infer, "charlm", [tokens([[1]])]) == "OK"

        # text requests; an open stream is a live sequence
        text.Predict(tpb.PredictRequest(model="chargru", text="hello"), timeout=30)
        text.Predict(tpb.PredictRequest(model="chargru", text="world"), timeout=30)
        try:
            text.Predict(tpb.PredictRequest(model="chargru", text="HELLO"), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(list(text.Generate(tpb.GenerateRequest(model="chargru", prompt="ab", max_tokens=5,
                                                          temperature=0), timeout=30))) == 5
        release = threading.Event()

        def chunks():
            yield tpb.StreamRequest(model="chargru", text="some ")
            release.wait(30)
            yield tpb.StreamRequest(text="text")

        stream = text.Stream(chunks(), timeout=30)
        next(stream)
        live = by(scrape(server.metrics_port), "rnnserve_live_sequences", "model", "version")
        assert live[("chargru", "1")] == 1 and live[("charlm", "1")] == 0
        release.set()
        assert len(list(stream)) == 1
        assert by(scrape(server.metrics_port), "rnnserve_live_sequences", "model", "version")[("chargru", "1")] == 0

        # ModelStreamInfer counts each streamed request
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put(error))
        for ids in ([[1, 2]], [[999]], [[3, 4]]):
            client.async_stream_infer("chargru", [tokens(ids)])
        errors = [answers.get(timeout=30) for _ in range(3)]
        client.stop_stream()
        assert [e is None for e in errors] == [True, False, True]

        # concurrent load: 16 clients x 4 requests (8 rows x 64 tokens, so that runs last long enough
        # for concurrent requests to overlap on a loaded machine) share onnxruntime runs
        def load(gate):
            own = tc.InferenceServerClient(address)
            gate.wait()
            try:
                return [code(own.infer, "bigru", [tokens([[5, 6, 7, 8] * 16] * 8)]) for _ in range(4)]
            finally:
                own.close()

        # Whether the clients overlap is up to the OS scheduler; a burst whose 64 requests all
        # ran alone is repeated (up to 5 bursts), and every count below scales with the bursts.
        for bursts in range(1, 6):
            gate = threading.Barrier(16)
            with ThreadPoolExecutor(16) as ex:
                assert [c for part in ex.map(load, [gate] * 16) for c in part] == ["OK"] * 64
            runs = by(scrape(server.metrics_port), "rnnserve_executions_total", "model", "version")
            if runs[("bigru", "1")] < 64 * bursts:
                break

        m = scrape(server.metrics_port)
        requests = by(m, "rnnserve_requests_total", "model", "version", "method", "code")
        assert requests == {
            ("charlm", "1", "ModelInfer", "OK"): 3,
            ("charlm", "2", "ModelInfer", "OK"): 2,
            ("charlm", "2", "ModelInfer", "INVALID_ARGUMENT"): 2,
            ("", "", "ModelInfer", "NOT_FOUND"): 2,
            ("charlm", "", "ModelInfer", "NOT_FOUND"): 1,
            ("broken", "1", "ModelInfer", "UNAVAILABLE"): 1,
            ("chargru", "1", "Predict", "OK"): 2,
            ("chargru", "1", "Predict", "INVALID_ARGUMENT"): 1,
            ("chargru", "1", "Generate", "OK"): 1,
            ("chargru", "1", "Stream", "OK"): 1,
            ("chargru", "1", "ModelStreamInfer", "OK"): 2,
            ("chargru", "1", "ModelStreamInfer", "INVALID_ARGUMENT"): 1,
            ("bigru", "1", "ModelInfer", "OK"): 64 * bursts,
        }
        per_call: Counter = Counter()
        for (model, version, method, _), n in requests.items():
            per_call[(model, version, method)] += n
        assert by(m, "rnnserve_request_duration_seconds_count", "model", "version", "method") == per_call
        assert all(v > 0 for v in by(m, "rnnserve_request_duration_seconds_sum", "model").values())

        inferences = by(m, "rnnserve_inferences_total", "model", "version")
        executions = by(m, "rnnserve_executions_total", "model", "version")
        assert inferences[("charlm", "1")] == 3 and inferences[("charlm", "2")] == 2   # rows run
        assert inferences[("bigru", "1")] == 512 * bursts                               # 8 rows each
        assert executions[("bigru", "1")] < 64 * bursts                                 # runs were shared
        for key, n in executions.items():
            assert 1 <= n <= inferences[key]
        assert by(m, "rnnserve_batch_size_count", "model", "version") == executions
        assert by(m, "rnnserve_batch_size_sum", "model", "version") == inferences
        assert by(m, "rnnserve_compute_duration_seconds_count", "model", "version") == executions
        queued = by(m, "rnnserve_queue_duration_seconds_count", "model", "version")
        assert queued[("bigru", "1")] == 64 * bursts and queued[("charlm", "1")] == 3
        # the same numbers as ModelStatistics, which counts every onnxruntime run itself
        stats = client.get_inference_statistics("bigru", "1").model_stats[0]
        assert stats.execution_count == executions[("bigru", "1")] and stats.inference_count == 512 * bursts
        buckets = [(float(labels["le"]), v) for labels, v in m["rnnserve_batch_size_bucket"]
                   if labels["model"] == "bigru"]
        assert max(v for _, v in buckets) == executions[("bigru", "1")]

        # the other server counted only its own request
        assert by(scrape(other.metrics_port), "rnnserve_requests_total", "model", "version", "code") == {
            ("charlm", "2", "OK"): 1}

        client.unload_model("chargru")
        state = by(scrape(server.metrics_port), "rnnserve_model_state", "model", "version", "state")
        assert state[("chargru", "1", "UNLOADED")] == 1 and state[("chargru", "1", "READY")] == 0
        client.close()


def test_no_metrics_endpoint_by_default(charlm_repo):
    with serving(charlm_repo) as (server, _):
        assert server.metrics_port is None and server.dataplane.metrics is None
