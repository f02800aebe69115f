"""The forecast task: data and split, training with baselines, checkpoint, export through the general gate."""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rnnserve.contract import parse_metadata
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.train.__main__ import main as train_main
from rnnserve.train.forecast import ForecastConfig, train_forecast
from rnnserve.train.forecast_data import ForecastDataError, load_series
from rnnserve.train.forecast_eval import horizon_targets, macro_f1, seasonal_naive
from rnnserve.train.forecast_model import load_forecaster
from tests.fixtures import TINY_FORECAST as TINY
from tests.fixtures import hourly_csv


@pytest.fixture(scope="module")
def hourly(tmp_path_factory) -> str:
    return hourly_csv(tmp_path_factory.mktemp("data") / "hourly.csv")


@pytest.fixture(scope="module")
def trained(hourly, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fc"))
    return train_forecast(ForecastConfig(out=out, data=hourly, target="temp", time_column="time", horizon=4, **TINY))


def test_split_is_chronological_and_statistics_come_from_train(hourly):
    s = load_series(hourly, target="temp", time_column="time")
    assert s.feature_names == ["temp", "wind", "hour", "day_of_year"]  # the categorical `sky` is not a default
    b0, b1 = s.bounds
    assert (b0, b1 - b0, len(s.target) - b1) == (350, 75, 75)
    temp = s.feature_info[0]
    assert temp.mean == pytest.approx(float(s.features[:b0, 0].astype(np.float64).mean()), rel=1e-5)
    assert temp.mean != pytest.approx(float(s.features[:, 0].mean()), rel=1e-4)  # the trend: all rows differ
    assert s.step_seconds == 3600 and s.head == "regression"
    with pytest.raises(ForecastDataError, match="no column"):
        load_series(hourly, target="nope", time_column="time")


def test_builtin_weather_tables():
    hourly = load_series("vega:seattle-temps")
    assert len(hourly.target) == 8759 and hourly.feature_names == ["temp", "hour", "day_of_year"]
    daily = load_series("vega:seattle-weather")
    assert daily.head == "classification" and daily.class_names == ["drizzle", "fog", "rain", "snow", "sun"]
    assert daily.feature_names == ["precipitation", "temp_max", "temp_min", "wind", "weather", "day_of_year"]


def test_baselines():
    y = np.arange(10.0)
    np.testing.assert_array_equal(horizon_targets(y, 2)[7], [8, 9])
    assert np.isnan(horizon_targets(y, 2)[9]).all()
    # period 3, forecast t+1 and t+2 from t = 5: the values at steps 3 and 4
    np.testing.assert_array_equal(seasonal_naive(y, np.array([5]), 2, 3), [[3, 4]])
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_training_writes_metrics_plot_and_a_self_contained_checkpoint(trained):
    out = os.path.dirname(trained.ckpt_path)
    events = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    test = [e for e in events if e["event"] == "test"]
    assert len(test) == 1 and [e["event"] for e in events].count("eval") == 2
    names = [r["name"] for r in test[0]["rows"]]
    assert names == ["model", "persistence", "seasonal naive (24 steps)"]
    assert all(r["mae"] > 0 and r["rmse"] >= r["mae"] for r in test[0]["rows"])
    assert os.path.getsize(os.path.join(out, "forecast.png")) > 10_000
    model, ckpt = load_forecaster(trained.ckpt_path)
    assert model.cfg.season == 24 and model.cfg.horizon == 4
    assert ckpt["feature_names"] == ["temp", "wind", "hour", "day_of_year"]


def test_export_takes_and_returns_raw_units(trained, tmp_path):
    res = export_checkpoint(trained.ckpt_path, str(tmp_path), threads=1)
    assert res.parity["pass"] and res.parity["stepwise"]
    sess = ort.InferenceSession(res.onnx_path, providers=["CPUExecutionProvider"])
    meta = parse_metadata(sess.get_modelmeta().custom_metadata_map)
    assert meta.feature_names == ["temp", "wind", "hour", "day_of_year"]
    assert [(s.input, s.output) for s in meta.spec.states] == [("h0", "hn"), ("history_in", "history_out")]
    assert meta.spec.output("forecast").shape == ("batch", "seq", 4)
    s = trained.series
    x = s.features[None, :200]
    model, _ = load_forecaster(trained.ckpt_path)
    feeds = {"features": x, "h0": np.zeros((1, 1, 8), np.float32), "history_in": np.zeros((1, 25), np.float32)}
    got = sess.run(["forecast"], feeds)[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # raw units: near the actual temperatures 4 hours ahead, not normalized values
    assert abs(float(np.mean(got[0, 100:196, 3] - s.target[104:200]))) < 3.0


def test_classification_head_via_cli(hourly, tmp_path, capsys):
    out = str(tmp_path / "sky")
    rc = train_main(["--task", "forecast", "--data", hourly, "--target", "sky", "--time-column", "time",
                     "--features", "temp", "--hidden-size", "8", "--seq-len", "24", "--batch-size", "8",
                     "--max-steps", "20", "--eval-interval", "10", "--out", out])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "same as today" in printed and "majority class" in printed
    model, ckpt = load_forecaster(os.path.join(out, "checkpoint.pt"))
    assert ckpt["class_names"] == ["fog", "rain", "sun"] and model.cfg.head == "classification"
    assert ckpt["feature_names"] == ["sky", "temp", "hour", "day_of_year"]
    res = export_checkpoint(os.path.join(out, "checkpoint.pt"), str(tmp_path / "onnx"), threads=1)
    meta = parse_metadata(ort.InferenceSession(res.onnx_path, providers=["CPUExecutionProvider"])
                          .get_modelmeta().custom_metadata_map)
    assert meta.class_names == ["fog", "rain", "sun"]
    assert meta.spec.output("class_logits").shape == ("batch", "seq", 3)


def test_export_batch_publishes_a_forecaster(trained, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from rnnserve.export.batch import BatchOptions, run_batch

    repo = str(tmp_path / "repo")
    outcome = run_batch(BatchOptions(checkpoints=[trained.ckpt_path], repository=repo, threads=1, progress=False))
    assert outcome.ok, outcome.failures
    name = os.path.basename(os.path.dirname(trained.ckpt_path))
    assert [r.status for r in outcome.rows] == ["new"] and outcome.rows[0].p50_ms > 0
    with open(os.path.join(repo, name, "config.pbtxt")) as f:
        cfg = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
    assert cfg.max_batch_size == 0 and [i.name for i in cfg.input] == ["features"]
    assert list(cfg.input[0].dims) == [1, -1, 4]
    assert [(s.input_name, s.output_name, list(s.dims)) for s in cfg.sequence_batching.state] == [
        ("h0", "hn", [1, 1, 8]), ("history_in", "history_out", [1, 25])]
