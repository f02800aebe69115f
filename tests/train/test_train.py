"""train/: the notes' hello task for all five presets, the charlm task, checkpoints.

Real torch training throughout (tiny models, a generated corpus), no mocks.
"""
from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch

from rnnserve.train.__main__ import main as train_main
from rnnserve.train.charlm import TrainConfig, train_charlm
from rnnserve.train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from rnnserve.train.data import CharData, random_windows
from rnnserve.train.evaluate import evaluate_windows
from rnnserve.train.hello import IDX2CHAR, TARGET_TEXT, X_DATA, train_hello
from rnnserve.train.model import PRESET_NAMES, CharRNN, ModelConfig

LINE = re.compile(r"^Predicted string: ([ehlo]{5}), Epoch \[(\d+)/15\] loss=(\d+\.\d{4})$")


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_hello_preset_learns_ohlol(preset, tmp_path, capsys):
    res = train_hello(preset, str(tmp_path))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 15
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(2)) for m in matches] == list(range(1, 16))
    assert matches[-1].group(1) == TARGET_TEXT  # the notes' last line
    assert res.predicted == TARGET_TEXT  # the trained model
    assert float(matches[-1].group(3)) == pytest.approx(res.final_loss, abs=5e-5)
    assert float(matches[-1].group(3)) < float(matches[0].group(3))

    model, ckpt = load_checkpoint(res.ckpt_path)
    assert ckpt["vocab"] == IDX2CHAR
    assert ckpt["train_config"]["task"] == "hello"
    assert ckpt["train_config"]["seq_len"] == 5
    assert ckpt["metrics"]["predicted"] == TARGET_TEXT
    x = torch.tensor([X_DATA])
    with torch.no_grad():
        assert torch.equal(model(x)[0], res.model(x)[0])


def test_hello_cli_prints_the_notes_line(tmp_path, capsys):
    assert train_main(["--task", "hello", "--model", "rnncell", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert LINE.match(out[-1]) and out[-1].startswith("Predicted string: ohlol, Epoch [15/15] loss=")
    assert os.path.isfile(tmp_path / "checkpoint.pt")


def _grammar_text(n_lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "my bird", "the old man", "a girl"]
    verb = ["sees", "likes", "eats", "finds"]
    obj = ["the fish.", "a ball.", "some bread.", "the moon."]
    return "".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}\n" for _ in range(n_lines))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_grammar_text(), encoding="utf-8")
    return str(path)


def _cfg(corpus, out, **kw):
    base = dict(corpus=corpus, out=str(out), model="char-lstm", seq_len=32, batch_size=16, lr=1e-2,
                warmup=5, max_steps=40, eval_interval=20, eval_windows=8, eval_window=64, log_interval=10,
                bf16=False, progress=False, seed=3, threads=1,
                model_overrides=dict(emb_size=16, hidden_size=48, num_layers=1))
    base.update(kw)
    return TrainConfig(**base)


def _events(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_charlm_lowers_val_loss_and_writes_outputs(corpus, tmp_path):
    out = tmp_path / "run"
    data = CharData.from_file(corpus)
    res = train_charlm(_cfg(corpus, out))
    assert res.step == 40
    events = _events(out)
    evals = [e for e in events if e["event"] == "eval"]
    trains = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in evals] == [20, 40]
    assert [e["step"] for e in trains] == list(range(2, 41, 2))  # the first 5 intervals 5x as often
    assert evals[-1]["val_bits"] == pytest.approx(evals[-1]["val_nats"] / 0.6931471805599453)
    assert os.path.getsize(out / "loss.png") > 1000
    assert os.path.isfile(out / "last.pt")

    # Untrained: about ln(vocab); trained: clearly lower, over the whole split.
    torch.manual_seed(0)
    fresh = _cfg(corpus, out).model_config(len(data.vocab))
    untrained = evaluate_windows(CharRNN(fresh), data.val, window=64)
    assert untrained > 2.5
    assert res.final_val_nats < untrained - 0.8

    # The checkpoint alone rebuilds the model, with identical outputs.
    model, ckpt = load_checkpoint(res.ckpt_path)
    assert ckpt["vocab"] == data.vocab and ckpt["train_config"]["task"] == "charlm"
    m = ckpt["metrics"]
    assert m["step"] == 40 and m["best_val_nats"] == pytest.approx(res.best_val_nats)
    assert m["val_full_nats"] == pytest.approx(res.final_val_nats)
    assert m["best_val_bits"] == pytest.approx(m["best_val_nats"] / 0.6931471805599453)
    x, _ = random_windows(data.val, 20, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, sa = model(x)
        b, sb = res.model(x)
    assert torch.equal(a, b) and all(torch.equal(p, q) for p, q in zip(sa, sb))
    assert evaluate_windows(model, data.val, window=64) == pytest.approx(res.final_val_nats, rel=1e-6)


def test_charlm_resume_continues_the_step_count(corpus, tmp_path):
    out = tmp_path / "run"
    train_charlm(_cfg(corpus, out, max_steps=20))
    first = read_checkpoint(str(out / "last.pt"))["train_state"]
    assert first["step"] == 20
    # threads=0: the thread tuner picks 1 or all cores by timing the steps.
    res = train_charlm(_cfg(corpus, out, max_steps=30, eval_interval=10, resume=True, threads=0))
    assert res.step == 30
    last = read_checkpoint(str(out / "last.pt"))["train_state"]
    assert last["step"] == 30 and last["elapsed"] > first["elapsed"]
    steps = [e["step"] for e in _events(out) if e["event"] == "train"]
    assert steps == list(range(2, 31, 2))  # the first run's history kept, continued from 20


def test_resume_after_a_finished_run_gets_time_budget_more(corpus, tmp_path, caplog):
    """--time-budget on --resume is this run's time, so a finished run can be continued; --max-steps
    stays a total, and a resume that has nothing left to do says so."""
    out = tmp_path / "run"
    budget = 0.01   # minutes
    first = train_charlm(_cfg(corpus, out, max_steps=None, time_budget=budget, eval_interval=10**6))
    assert first.elapsed_s >= budget * 60
    saved = read_checkpoint(str(out / "last.pt"))["train_state"]["elapsed"]   # what a resume starts from
    again = train_charlm(_cfg(corpus, out, max_steps=None, time_budget=budget, eval_interval=10**6, resume=True))
    assert again.step > first.step
    assert again.elapsed_s >= saved + budget * 60
    caplog.clear()
    done = train_charlm(_cfg(corpus, out, max_steps=again.step, resume=True))
    assert done.step == again.step
    assert "nothing to train" in caplog.text and "raise --max-steps" in caplog.text


def test_charlm_cli_and_determinism(corpus, tmp_path):
    args = ["--task", "charlm", "--corpus", corpus, "--max-steps", "10", "--eval-interval", "10",
            "--eval-windows", "4", "--eval-window", "64", "--seq-len", "16", "--batch-size", "8",
            "--hidden-size", "24", "--num-layers", "1", "--emb-size", "8", "--bf16", "false",
            "--no-progress", "--seed", "7", "--threads", "1"]
    assert train_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert train_main(args + ["--out", str(tmp_path / "b")]) == 0
    ma = read_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))
    mb = read_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    assert ma["model_config"]["hidden_size"] == 24
    assert ma["metrics"]["val_full_nats"] == mb["metrics"]["val_full_nats"]
    assert all(torch.equal(ma["state_dict"][k], mb["state_dict"][k]) for k in ma["state_dict"])


def test_evaluate_windows_covers_every_prediction_once():
    """Windows of 4 over 11 ids: 10 predictions = 2 full windows + a tail of 2."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(arch="gru", vocab_size=5, emb_size=4, hidden_size=6))
    ids = torch.randint(0, 5, (11,))
    got = evaluate_windows(model, ids, window=4, batch_size=1)
    total = 0.0
    for start, n in ((0, 4), (4, 4), (8, 2)):  # each window from a zero state
        with torch.no_grad():
            logits, _ = model(ids[start:start + n][None])
        total += float(torch.nn.functional.cross_entropy(logits[0], ids[start + 1:start + n + 1],
                                                         reduction="sum"))
    assert got == pytest.approx(total / 10, rel=1e-6)
    assert evaluate_windows(model, ids, window=4, batch_size=64) == pytest.approx(got, rel=1e-6)


def test_missing_and_corrupt_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint\x00\x01" * 10)
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(str(bad))
    res = train_hello("emb-gru", str(tmp_path / "h"), verbose=False)
    raw = open(res.ckpt_path, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(str(truncated))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not an rnnserve checkpoint"):
        load_checkpoint(str(other))


def test_progress_bar_counts_against_the_run_and_shows_the_latest_best(corpus, tmp_path, capsys):
    res = train_charlm(_cfg(corpus, tmp_path / "run", max_steps=20, eval_interval=10, progress=True))
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    evals = [e for e in _events(tmp_path / "run") if e["event"] == "eval"]
    assert bar.startswith("100%|") and "step 20" in bar and "<00:00" in bar   # a total and an ETA
    assert f"best_val {res.best_val_nats:.3f}" in bar and res.best_val_nats == min(e["val_nats"] for e in evals)
