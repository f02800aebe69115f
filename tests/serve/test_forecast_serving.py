"""A forecaster served: CSV rows streamed one at a time through a sequence (rnnserve-client forecast)
equal onnxruntime over the same rows in one run; the tensor infer command takes float features."""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.export.batch import BatchOptions, run_batch
from rnnserve.serve.client import main as client_main
from rnnserve.timeseries import frames, read_table
from rnnserve.train.forecast import ForecastConfig, train_forecast
from tests.fixtures import TINY_FORECAST, hourly_csv, serving

# Not the CSV's default columns (those add `wind`): the client must take the order the server reports.
FEATURES = ["temp", "hour", "day_of_year"]


@pytest.fixture(scope="module")
def forecast_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast_serving")
    csv = hourly_csv(root / "hourly.csv", n=300, seed=3)
    result = train_forecast(ForecastConfig(out=str(root / "weather"), data=csv, target="temp", time_column="time",
                                           features=["temp"], horizon=3, **TINY_FORECAST))
    # Published as `rnnserve-export batch` does: through the gate, with the config.pbtxt the server reads too.
    outcome = run_batch(BatchOptions(checkpoints=[result.ckpt_path], repository=str(root / "repo"), threads=1,
                                     progress=False))
    assert outcome.ok, outcome.failures
    assert os.path.exists(root / "repo" / "weather" / "config.pbtxt")
    return str(root / "repo"), csv


def _client_json(capsys, *args: str) -> dict:
    assert client_main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_forecast_command_streams_rows_through_a_sequence(forecast_repo, capsys):
    repo, csv = forecast_repo
    with serving(repo) as (_, address):
        out = _client_json(capsys, "--address", address, "--json", "forecast", "weather", "--data", csv,
                           "--target", "temp", "--time-column", "time", "--start-row", "200", "--rows", "6",
                           "--warmup", "30")
    assert out["output"] == "forecast" and out["horizon"] == 3 and len(out["rows"]) == 6
    assert out["feature_names"] == FEATURES
    # The same 36 rows in one onnxruntime run, state from zeros: the streamed answers must match.
    x = frames(read_table(csv), FEATURES, "time")[None, 170:206]
    sess = ort.InferenceSession(os.path.join(repo, "weather", "1", "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"features": x, "h0": np.zeros((1, 1, 8), np.float32), "history_in": np.zeros((1, 25), np.float32)}
    whole = sess.run(["forecast"], feeds)[0][0, 30:]
    streamed = np.array([[r["forecast_next"], r["forecast_last"]] for r in out["rows"]])
    np.testing.assert_allclose(streamed, whole[:, [0, 2]], atol=1e-4)
    actual = read_table(csv)["temp"]
    assert [r["actual_next"] for r in out["rows"]] == pytest.approx([float(actual[i + 1]) for i in range(200, 206)])


def test_infer_takes_float_features(forecast_repo, capsys, tmp_path):
    repo, _ = forecast_repo
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"features": [[[12.5, 5.0, 60.0], [13.0, 6.0, 60.0]]]}))
    with serving(repo) as (_, address):
        by_flag = _client_json(capsys, "--address", address, "--json", "infer", "weather",
                               "--features", "12.5,5,60;13,6,60", "--output", "forecast")
        by_file = _client_json(capsys, "--address", address, "--json", "infer", "weather", "--inputs", str(inputs),
                               "--output", "forecast", "--sequence-id", "9", "--start", "--end")
    assert by_flag["forecast"]["shape"] == [1, 2, 3] and by_flag["forecast"]["datatype"] == "FP32"
    np.testing.assert_allclose(by_file["forecast"]["data"], by_flag["forecast"]["data"], atol=1e-5)


def test_an_exported_user_module_serves_like_ours(tmp_path):
    """export_module's folder dropped into a repository: streamed steps equal the module's whole run."""
    import torch

    from rnnserve.export.module import export_module
    from rnnserve.serve.client import RnnClient
    from tests.user_modules import GRUTagger

    torch.manual_seed(5)
    tagger = GRUTagger().eval()
    repo = tmp_path / "repo"
    export_module(tagger, str(repo / "tagger" / "1"), inputs={"tokens": torch.randint(0, 30, (2, 6)),
                                                              "h0": torch.zeros(1, 2, 16)},
                  outputs=["tags", "hn"], states=[("h0", "hn")], gate=False)
    tokens = np.random.default_rng(6).integers(0, 30, (1, 9)).astype(np.int64)
    with torch.no_grad():
        whole = tagger(torch.from_numpy(tokens), torch.zeros(1, 1, 16))[0].numpy()
    with serving(str(repo)) as (_, address), RnnClient(address) as client:
        steps = [client.infer_tensors("tagger", {"tokens": tokens[:, t:t + 3]}, sequence_id=11,
                                      start=t == 0, end=t == 6, outputs=["tags"])["tags"]
                 for t in range(0, 9, 3)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole, atol=1e-5)


def test_concurrent_sensors_each_equal_their_own_run(forecast_repo):
    """Four sensors stream one reading at a time, concurrently (the server may batch their steps across
    sequences): each one's forecasts equal onnxruntime over its own rows in one run."""
    from concurrent.futures import ThreadPoolExecutor

    from rnnserve.serve.client import RnnClient

    repo, csv = forecast_repo
    x = frames(read_table(csv), FEATURES, "time")
    starts = (20, 90, 150, 230)
    sess = ort.InferenceSession(os.path.join(repo, "weather", "1", "model.onnx"), providers=["CPUExecutionProvider"])

    def alone(start: int) -> np.ndarray:
        feeds = {"features": x[None, start:start + 12], "h0": np.zeros((1, 1, 8), np.float32),
                 "history_in": np.zeros((1, 25), np.float32)}
        return sess.run(["forecast"], feeds)[0][0]

    with serving(repo) as (_, address):
        def sensor(k: int) -> np.ndarray:
            with RnnClient(address) as client:
                return np.concatenate([client.infer_tensors(
                    "weather", {"features": x[None, starts[k] + t:starts[k] + t + 1]}, outputs=["forecast"],
                    sequence_id=100 + k, start=t == 0, end=t == 11)["forecast"][0]
                    for t in range(12)])

        with ThreadPoolExecutor(4) as ex:
            streamed = list(ex.map(sensor, range(4)))
    for k, start in enumerate(starts):
        np.testing.assert_allclose(streamed[k], alone(start), atol=1e-4)
