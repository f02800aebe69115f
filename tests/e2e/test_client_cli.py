"""`rnnserve-client` as a subprocess against a real server, plus the
importable RnnClient (its infer must match tritonclient's bit for bit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as tc

from rnnserve.serve.client import RnnClient
from tests.fixtures import HELLO_MODELS, ROOT


@pytest.fixture(scope="module")
def address(hello_server):
    return hello_server[1]


def cli(address: str, *args: str, json_output: bool = True, env_address: bool = False):
    env = dict(os.environ)
    argv = [sys.executable, "-m", "rnnserve.serve.client"]
    if env_address:
        env["RNNSERVE_ADDRESS"] = address
    else:
        argv += ["--address", address]
    argv += list(args) + (["--json"] if json_output else [])
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    return proc.returncode, (json.loads(proc.stdout) if json_output else proc.stdout), proc.stderr


def test_health_models_metadata(address):
    rc, out, _ = cli(address, "health", env_address=True)
    assert rc == 0 and out == {"service": "", "status": "SERVING"}
    rc, out, _ = cli(address, "health", "--service", "emb-gru")
    assert rc == 0 and out["status"] == "SERVING"
    rc, out, _ = cli(address, "models")
    assert rc == 0 and {(m["name"], m["state"]) for m in out["models"]} == \
        {(m, "READY") for m in HELLO_MODELS}
    rc, out, _ = cli(address, "metadata")
    assert rc == 0 and out["name"] == "rnnserve"
    rc, out, _ = cli(address, "metadata", "emb-lstm")
    assert rc == 0 and out["inputs"][0] == {"name": "tokens", "datatype": "INT64",
                                            "shape": [-1, -1]}


def test_predict_all_five(address):
    for model in HELLO_MODELS:
        rc, out, err = cli(address, "predict", model, "hello")
        assert rc == 0, err
        assert out["decoded"] == "ohlol" and len(out["positions"]) == 5


def test_readable_output(address):
    rc, out, _ = cli(address, "predict", "rnn", "hello", json_output=False)
    assert rc == 0 and out.splitlines()[0] == "ohlol"
    rc, out, _ = cli(address, "generate", "emb-gru", "he", "--max-tokens", "6", "--seed", "3",
                     json_output=False)
    assert rc == 0 and out.startswith("he") and "[6 tokens, finish: length]" in out


def test_generate_score_infer(address):
    rc, out, _ = cli(address, "generate", "emb-lstm", "h", "--max-tokens", "8", "--seed", "1")
    assert rc == 0 and len(out["tokens"]) == 8 and len(out["text"]) == 8
    assert out["finish_reason"] == "length"
    rc, again, _ = cli(address, "generate", "emb-lstm", "h", "--max-tokens", "8", "--seed", "1")
    assert again == out
    rc, out, _ = cli(address, "score", "emb-gru", "hello")
    assert rc == 0 and out["num_predicted"] == 4 and out["bits_per_char"] > 0
    rc, out, _ = cli(address, "infer", "rnn", "--tokens", "0,1,2;3,2,1")
    assert rc == 0 and out["logits"]["shape"] == [2, 3, 4] and out["logits"]["datatype"] == "FP32"
    with RnnClient(address) as client:
        direct = client.infer("rnn", np.array([[0, 1, 2], [3, 2, 1]]))
    assert np.array(out["logits"]["data"], dtype=np.float32).tobytes() == direct["logits"].tobytes()


def test_errors_exit_1(address):
    rc, out, _ = cli(address, "predict", "nope", "hello")
    assert rc == 1 and out["error"]["code"] == "NOT_FOUND"
    rc, out, _ = cli(address, "infer", "rnn", "--tokens", "0,7")
    assert rc == 1 and out["error"]["code"] == "INVALID_ARGUMENT"
    rc, _, err = cli(address, "score", "rnn", "hexlo", json_output=False)
    assert rc == 1 and "INVALID_ARGUMENT" in err and "'x'" in err


def test_rnn_client_matches_tritonclient(address):
    tokens = np.array([[0, 1, 2, 2, 3]], dtype=np.int64)
    h0 = np.full((2, 1, 8), 0.25, dtype=np.float32)
    c0 = np.full((2, 1, 8), -0.5, dtype=np.float32)
    with RnnClient(address) as client:
        assert client.health() == "SERVING" and client.live() and client.ready()
        assert client.ready("emb-lstm") and client.config("emb-lstm")["name"] == "emb-lstm"
        ours = client.infer("emb-lstm", tokens, h0=h0, c0=c0)
        assert [e["text"] for e in client.generate("emb-lstm", "he", max_tokens=3, seed=2)]
    triton = tc.InferenceServerClient(address)
    inputs = []
    for name, array, dt in (("tokens", tokens, "INT64"), ("h0", h0, "FP32"), ("c0", c0, "FP32")):
        inputs.append(tc.InferInput(name, list(array.shape), dt))
        inputs[-1].set_data_from_numpy(array)
    theirs = triton.infer("emb-lstm", inputs)
    triton.close()
    assert set(ours) == {"logits", "hn", "cn"}
    for name, array in ours.items():
        assert array.tobytes() == theirs.as_numpy(name).tobytes()


def test_a_bad_address_is_refused_before_dialing(address):
    for bad in ("127.0.0.1:", "127.0.0.1", ":8001", "localhost:http"):
        rc, _, err = cli(bad, "health", json_output=False)
        assert rc == 2 and "is not HOST:PORT" in err and "Traceback" not in err, err
    rc, _, err = cli("127.0.0.1:", "health", json_output=False, env_address=True)
    assert rc == 2 and "is not HOST:PORT" in err


def test_an_error_after_partial_output_starts_on_its_own_line(address):
    rc, out, err = cli(address, "generate", "rnn", "Hex", json_output=False)
    assert rc == 1 and out == "Hex\n" and err.startswith("error: INVALID_ARGUMENT")


def test_a_closed_pipe_ends_quietly(address):
    """`| head`: the reader goes away while the client still has more to write than a pipe holds
    (6000 streamed chunks, about 130 KB)."""
    command = (f"seq 6000 | sed s/.*/hello/ | {sys.executable} -m rnnserve.serve.client "
               f"--address {address} stream emb-gru | head -c 23; exit ${{PIPESTATUS[2]}}")   # the client's
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout == "  0 'hello' -> 'ohlol'\n"
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_stop_strings_take_escapes(charlm_repo):
    from rnnserve.serve.client import unescape
    from tests.fixtures import serving

    assert unescape(r"a\nb\tc\\n\x") == "a\nb\tc\\n\\x"
    with serving(charlm_repo) as (_, addr):
        rc, out, err = cli(addr, "generate", "charlm", "a", "--max-tokens", "60", "--seed", "2",
                           "--temperature", "2", "--stop", r"\n")
    assert rc == 0, err
    assert out["finish_reason"] == "stop" and out["text"].endswith("\n") and out["text"].count("\n") == 1
