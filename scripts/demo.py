"""The main job on the built-in default (`make demo`).

1. Train the lecture notes' five models on "hello" -> "ohlol".
2. Export each to ONNX through the parity gate, into a model repository
   (runs/demo/repository/<model>/<version>/model.onnx), and print each model's
   answer for "hello" from onnxruntime.
3. Start the gRPC server on 127.0.0.1 (a free port), as a separate process.
4. Query it with the client CLI: five times "hello" -> "ohlol", plus one generate.
   The weather forecaster (trained on Seattle's hourly temperatures with a short budget and
   exported into the same repository before the server starts) gets a day of readings
   streamed one at a time through a sequence: forecast against actual.
5. Stop the server with SIGTERM and check that it drained and exited 0, and print the
   forecaster's test-split table against its baselines.

Usage: python scripts/demo.py [--out runs/demo]
"""
from __future__ import annotations

import argparse
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.contract import parse_metadata
from rnnserve.export.batch import BatchOptions, format_report, run_batch
from rnnserve.train.forecast import ForecastConfig, train_forecast
from rnnserve.train.forecast_eval import format_table
from rnnserve.train.hello import INPUT_TEXT, TARGET_TEXT, train_hello
from rnnserve.train.model import PRESET_NAMES

log = logging.getLogger("demo")
WEATHER = "weather"
WEATHER_STEPS, WEATHER_BUDGET_MIN = 400, 1.5   # a short budget: whichever ends first


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def onnx_predict(path: Path, text: str) -> str:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = parse_metadata(sess.get_modelmeta().custom_metadata_map)
    ids = np.array([[meta.vocab.index(c) for c in text]], dtype=np.int64)
    feeds = {"tokens": ids}
    for name in meta.state_inputs:
        feeds[name] = np.zeros(meta.state_shape(1), np.float32)
    logits = sess.run(["logits"], feeds)[0]
    return "".join(meta.vocab[i] for i in logits[0].argmax(-1))


def wait_for_port(proc: subprocess.Popen, port_file: Path, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with code {proc.returncode}")
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        time.sleep(0.1)
    raise SystemExit("server did not start in time")


def client(address: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "rnnserve.serve.client", "--address", address, *args]
    print("$ " + " ".join(["python", "-m", "rnnserve.serve.client", "--address", address, *args]), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.rstrip(), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="working folder (recreated)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ckpts, repo = out / "checkpoints", out / "repository"

    banner(f"1. train the five seed models: {INPUT_TEXT!r} -> {TARGET_TEXT!r}")
    for preset in PRESET_NAMES:
        print(f"--- {preset}", flush=True)
        result = train_hello(preset, str(ckpts / preset))
        if result.predicted != TARGET_TEXT:
            raise SystemExit(f"{preset} ended on {result.predicted!r}, not {TARGET_TEXT!r}")

    print(f"--- {WEATHER}: forecast the next 24 hourly temperatures (vega_datasets seattle-temps)", flush=True)
    weather = train_forecast(ForecastConfig(out=str(ckpts / WEATHER), max_steps=WEATHER_STEPS,
                                            time_budget=WEATHER_BUDGET_MIN))

    banner("2. export to ONNX (parity gate) into the model repository")
    outcome = run_batch(BatchOptions(checkpoints=[str(ckpts)], repository=str(repo), threads=1))
    print(format_report(outcome), flush=True)
    if not outcome.ok:
        raise SystemExit(f"export failed: {outcome.failures}")
    for preset in PRESET_NAMES:
        onnx_path = max((repo / preset).glob("*/model.onnx"), key=lambda p: int(p.parent.name))
        print(f"onnxruntime {preset:9s} {INPUT_TEXT!r} -> {onnx_predict(onnx_path, INPUT_TEXT)!r}"
              f"   ({onnx_path})", flush=True)

    banner("3. start the gRPC server on 127.0.0.1")
    port_file = out / "server.port"
    server_log = open(out / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnserve.serve", "--repository", str(repo), "--host", "127.0.0.1",
         "--port", "0", "--port-file", str(port_file)],
        stdout=server_log, stderr=subprocess.STDOUT)
    try:
        port = wait_for_port(proc, port_file)
        address = f"127.0.0.1:{port}"
        print(f"server pid {proc.pid} listening on {address} (log: {out / 'server.log'})", flush=True)

        banner("4. query it with the client")
        client(address, "health")
        client(address, "models")
        for preset in PRESET_NAMES:
            answer = client(address, "predict", preset, INPUT_TEXT, "--top-k", "2")
            if TARGET_TEXT not in answer:
                raise SystemExit(f"{preset}: server did not answer {TARGET_TEXT!r}")
        client(address, "generate", "emb-lstm", "hel", "--max-tokens", "12", "--temperature", "0")
        client(address, "metadata", WEATHER)
        client(address, "forecast", WEATHER, "--rows", "24", "--warmup", "48")
    finally:
        banner("5. stop the server (SIGTERM, graceful drain)")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        server_log.close()
        print(f"server exited with code {code}", flush=True)
    if code != 0:
        raise SystemExit(f"server exit code {code}")
    banner(f"{WEATHER}: test split (the last 15% of 2010, hourly), forecasts 1-24 h ahead, °F")
    print(format_table(weather.test_rows), flush=True)
    print(f"plot: {ckpts / WEATHER / 'forecast.png'}")
    banner("demo finished: six models trained, exported, served and queried")
    return 0


if __name__ == "__main__":
    sys.exit(main())
