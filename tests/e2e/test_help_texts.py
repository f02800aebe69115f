"""Every command's --help says what each flag does and shows its default; no stale issue numbers."""
from __future__ import annotations

import argparse
import importlib

import pytest

COMMANDS = [("rnnserve.train.__main__", []), ("rnnserve.train.evaluate", []), ("rnnserve.export.__main__", []),
            ("rnnserve.export.__main__", ["batch"]), ("rnnserve.serve.__main__", []),
            *[("rnnserve.serve.client", [sub]) for sub in ("health", "metadata", "predict", "generate", "score",
                                                           "stream", "infer")],
            *[(f"bench.{m}", []) for m in ("bench_batching", "bench_engine", "bench_latency", "bench_server",
                                           "floor", "quality", "stream_threads", "bench_defaults", "lone_runs",
                                           "wide_runs", "gpu_check", "dataplane_steps")]]


def _parsers(module: str, argv: list[str], monkeypatch) -> list[argparse.ArgumentParser]:
    """The parsers a command's main() builds, caught as it parses --help."""
    seen = []
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        seen.append(self)
        return original(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main([*argv, "--help"])
    assert done.value.code == 0
    return seen


@pytest.mark.parametrize("module,argv", COMMANDS, ids=[f"{m}:{' '.join(a)}" for m, a in COMMANDS])
def test_every_flag_says_what_it_does_and_its_default(module, argv, monkeypatch, capsys):
    parsers = _parsers(module, argv, monkeypatch)
    text = capsys.readouterr().out
    assert "issue" not in text.lower()
    parser = parsers[-1]
    if argv and argv[0] in (parser._subparsers._group_actions[0].choices if parser._subparsers else {}):
        parser = parser._subparsers._group_actions[0].choices[argv[0]]
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip("[]").lower() != action.dest.replace("_", " "), name
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert shows_defaults or "default" in action.help, f"{name}: no default shown"
