"""Every command's answer to a user's mistake: one line `error: ...` on stderr, no traceback, exit 2.

Real files throughout: a trained hello checkpoint, a text file posing as one, missing paths,
and a corpus whose characters the checkpoint's vocabulary lacks.
"""
from __future__ import annotations

import pytest

from rnnserve.export.__main__ import main as export_main
from rnnserve.train.__main__ import main as train_main
from rnnserve.train.evaluate import main as evaluate_main
from rnnserve.train.hello import train_hello


@pytest.fixture(scope="module")
def hello_ckpt(tmp_path_factory) -> str:
    return train_hello("emb-gru", str(tmp_path_factory.mktemp("hello")), verbose=False).ckpt_path


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("ihello there, this is text and not a checkpoint\n" * 20)
    helloish = tmp_path / "hello.txt"
    helloish.write_text("hello" * 200)
    return {"text": str(text), "hello": str(helloish), "missing": str(tmp_path / "nope.pt"), "dir": str(tmp_path)}


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_evaluate_user_errors(hello_ckpt, files, capsys):
    _one_line_error(capsys, evaluate_main([files["text"], "--corpus", files["hello"]]),
                    "is not a torch checkpoint", "give a checkpoint.pt")
    _one_line_error(capsys, evaluate_main([files["missing"], "--corpus", files["hello"]]),
                    "checkpoint not found")
    _one_line_error(capsys, evaluate_main([files["dir"], "--corpus", files["hello"]]), "is a directory")
    _one_line_error(capsys, evaluate_main([hello_ckpt, "--corpus", files["missing"]]), "corpus not found")
    line = _one_line_error(capsys, evaluate_main([hello_ckpt, "--corpus", files["text"]]),
                           "the checkpoint's vocabulary does not match the corpus", "'i'",
                           "evaluate on the text the model was trained on")
    assert "(4 characters)" in line
    assert evaluate_main([hello_ckpt, "--corpus", files["hello"], "--window", "8"]) == 0
    assert "nats/char" in capsys.readouterr().out


def test_train_user_errors(files, tmp_path, capsys):
    base = ["--task", "charlm", "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "run")]
    _one_line_error(capsys, train_main(base + ["--corpus", files["missing"]]), "corpus not found")
    _one_line_error(capsys, train_main(base + ["--corpus", files["text"], "--resume"]),
                    "checkpoint not found", "last.pt")


def test_export_user_errors(files, tmp_path, capsys):
    out = str(tmp_path / "out")
    _one_line_error(capsys, export_main([files["text"], "--out", out]), "is not a torch checkpoint")
    _one_line_error(capsys, export_main([files["missing"], "--out", out]), "checkpoint not found")
    _one_line_error(capsys, export_main(["batch", "--checkpoints", files["missing"], "--repository", out,
                                         "--no-progress"]), "no checkpoint", "rnnserve-train")
