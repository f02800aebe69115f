"""One statistics path (serve/stats.py): every onnxruntime run and every answered request makes
one record that feeds ModelStatistics and the Prometheus metrics together. Over a real server:
the two sources agree, and the counts mean what Triton's do (inference_count = rows served,
execution_count = onnxruntime runs, so inference_count >= execution_count)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import tritonclient.grpc as tc

from rnnserve.serve.client import main as client_main
from rnnserve.serve.wire.gen import text_service_pb2 as tpb
from rnnserve.serve.wire.gen import text_service_pb2_grpc as tpb_grpc
from tests.fixtures import serving
from tests.serve.test_metrics import by, code, scrape, tokens


def _stats(client: tc.InferenceServerClient, model: str):
    [s] = client.get_inference_statistics(model, "1").model_stats
    return s


def _agree(m: dict, s, key: tuple[str, str]) -> None:
    """ModelStatistics `s` of one version and the scraped Prometheus metrics `m` say the same."""
    inf = s.inference_stats
    assert by(m, "rnnserve_inferences_total", "model", "version")[key] == s.inference_count
    assert by(m, "rnnserve_executions_total", "model", "version")[key] == s.execution_count
    assert by(m, "rnnserve_batch_size_count", "model", "version")[key] == s.execution_count
    assert by(m, "rnnserve_batch_size_sum", "model", "version")[key] == s.inference_count
    assert by(m, "rnnserve_compute_duration_seconds_count", "model", "version")[key] == s.execution_count
    assert by(m, "rnnserve_queue_duration_seconds_count", "model", "version")[key] == inf.queue.count
    assert sum(b.compute_infer.count for b in s.batch_stats) == s.execution_count
    sizes = {b.batch_size: b.compute_infer.count for b in s.batch_stats}
    assert sum(size * n for size, n in sizes.items()) == s.inference_count
    requests = by(m, "rnnserve_requests_total", "model", "version", "code")
    ok = sum(n for (mo, v, c), n in requests.items() if (mo, v) == key and c == "OK")
    failed = sum(n for (mo, v, c), n in requests.items() if (mo, v) == key and c != "OK")
    assert (ok, failed) == (inf.success.count, inf.fail.count)
    durations = by(m, "rnnserve_request_duration_seconds_count", "model", "version")
    assert durations[key] == inf.success.count + inf.fail.count
    assert inf.queue.count == inf.compute_input.count == inf.compute_infer.count == inf.compute_output.count


def test_generate_and_predict_agree_with_prometheus(charlm_repo, capsys):
    """The issue's case: `generate --max-tokens 20` and one `predict` through rnnserve-client gave
    inference_count 2 and execution_count 21, while Prometheus said 21 and 21."""
    with serving(charlm_repo, metrics_port=0) as (server, address):
        assert client_main(["--address", address, "generate", "chargru", "ab", "--max-tokens", "20",
                            "--temperature", "0"]) == 0
        assert client_main(["--address", address, "predict", "chargru", "hello"]) == 0
        capsys.readouterr()
        client = tc.InferenceServerClient(address)
        s = _stats(client, "chargru")
        # generate: the prompt run, then one run per further token (19); predict: one run. 1 row each.
        assert (s.inference_count, s.execution_count) == (21, 21)
        assert s.inference_stats.success.count == 2 and s.inference_stats.fail.count == 0
        _agree(scrape(server.metrics_port), s, ("chargru", "1"))
        client.close()


def test_requests_runs_and_rows_agree_with_prometheus(charlm_repo):
    """Batches of several rows, a client error, text requests and shared runs under load."""
    with serving(charlm_repo, metrics_port=0) as (server, address):
        client = tc.InferenceServerClient(address)
        for batch in (1, 3, 3):
            assert code(client.infer, "chargru", [tokens(np.zeros((batch, 4), np.int64))]) == "OK"
        assert code(client.infer, "chargru", [tokens(np.full((1, 4), 99, np.int64))]) == "INVALID_ARGUMENT"
        assert client_main(["--address", address, "predict", "chargru", "abc"]) == 0
        assert client_main(["--address", address, "generate", "chargru", "abc", "--max-tokens", "5",
                            "--temperature", "0"]) == 0
        s = _stats(client, "chargru")
        assert s.inference_count == 1 + 3 + 3 + 1 + 5 and s.execution_count == 3 + 1 + 5
        assert s.inference_stats.success.count == 5 and s.inference_stats.fail.count == 1
        assert {b.batch_size: b.compute_infer.count for b in s.batch_stats} == {1: 7, 3: 2}
        _agree(scrape(server.metrics_port), s, ("chargru", "1"))

        # one-row requests from several clients at once: every row counted, runs at most rows
        with ThreadPoolExecutor(8) as ex:
            assert list(ex.map(lambda _: code(client.infer, "bigru", [tokens([[5, 6, 7, 8]])]), range(32))) == \
                ["OK"] * 32
        b = _stats(client, "bigru")
        assert b.inference_count == 32 >= b.execution_count
        _agree(scrape(server.metrics_port), b, ("bigru", "1"))
        client.close()


def test_a_generate_the_client_abandons_counts_as_cancelled_in_both(charlm_repo):
    """The observation sits outside the error map: a call the client cancels mid-stream is
    CANCELLED in Prometheus and a failure in ModelStatistics."""
    with serving(charlm_repo, metrics_port=0) as (server, address), grpc.insecure_channel(address) as channel:
        call = tpb_grpc.TextServiceStub(channel).Generate(
            tpb.GenerateRequest(model="chargru", prompt="ab", max_tokens=1000, temperature=0), timeout=60)
        next(call), next(call)
        call.cancel()
        client = tc.InferenceServerClient(address)
        deadline = time.monotonic() + 30
        while _stats(client, "chargru").inference_stats.fail.count == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        s = _stats(client, "chargru")
        assert s.inference_stats.fail.count == 1 and s.inference_stats.success.count == 0
        assert 2 <= s.execution_count < 1000
        m = scrape(server.metrics_port)
        assert by(m, "rnnserve_requests_total", "model", "version", "method", "code") == {
            ("chargru", "1", "Generate", "CANCELLED"): 1}
        _agree(m, s, ("chargru", "1"))
        client.close()
