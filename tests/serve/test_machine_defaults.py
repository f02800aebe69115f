"""The onnxruntime threading a server gets when --threads / --instances are left at 0."""
from __future__ import annotations

import logging

from rnnserve.serve import __main__ as server_main
from rnnserve.serve import settings as settings_module
from rnnserve.serve.settings import ServeSettings, machine_threading, with_machine_defaults


def test_small_machines_get_one_thread_and_one_instance():
    """(intra-op threads, instances, lone-run threads, wide-run threads); one core has no lone or
    wide runs (1 = off), and from 4 cores there are no wide runs."""
    assert machine_threading(1) == (1, 1, 1, 1) and machine_threading(2) == (1, 1, 2, 2)
    assert machine_threading(3) == (1, 1, 2, 2)
    assert machine_threading(4) == (1, 2, 2, 1) and machine_threading(16) == (4, 2, 2, 1)


def test_defaults_are_filled_and_logged_flags_win(caplog):
    with caplog.at_level(logging.INFO, logger="rnnserve.serve.settings"):
        chosen = with_machine_defaults(ServeSettings(repository="r"), cores=2)
    assert (chosen.intra_op_threads, chosen.instances, chosen.lone_threads) == (1, 1, 2) and chosen.lone_extra
    assert "1 intra-op threads per session (chosen), 1 instances (chosen)" in caplog.text
    assert "lone runs: 2 threads, spinning while they run (chosen)" in caplog.text
    assert chosen.wide_threads == 2 and chosen.wide_extra
    assert "wide runs: 2 threads, not spinning (chosen)" in caplog.text
    given = with_machine_defaults(ServeSettings(repository="r", intra_op_threads=3), cores=16)
    assert (given.intra_op_threads, given.instances) == (3, 2)
    both = ServeSettings(repository="r", intra_op_threads=2, instances=3, lone_threads=1, wide_threads=2)
    assert with_machine_defaults(both, cores=16) is both and not both.lone_extra
    assert not both.wide_extra                     # no more threads than the shared session has


def test_big_machines_keep_lone_runs_with_fewer_threads_than_the_shared_session(caplog):
    """16 cores: 4 shared threads that never spin, and lone runs on 2 that spin (README)."""
    with caplog.at_level(logging.INFO, logger="rnnserve.serve.settings"):
        chosen = with_machine_defaults(ServeSettings(repository="r"), cores=16)
    assert (chosen.intra_op_threads, chosen.instances, chosen.lone_threads) == (4, 2, 2) and chosen.lone_extra
    assert "lone runs: 2 threads, spinning while they run (chosen)" in caplog.text
    assert not chosen.wide_extra and "wide runs: off (chosen)" in caplog.text


def test_the_help_shows_what_0_chooses_on_this_machine(monkeypatch):
    """The per-core rule lives in machine_threading alone; each threading flag's help names its
    choice for the cores this process may use."""
    monkeypatch.setattr(settings_module, "machine_cores", lambda: 16)
    monkeypatch.setattr(server_main, "machine_cores", lambda: 16)
    text = " ".join(server_main.build_parser({}).format_help().split()).split("options:", 1)[1]
    chosen = machine_threading(16)
    for flag, value in (("--threads", chosen.threads), ("--instances", chosen.instances),
                        ("--lone-threads", chosen.lone), ("--wide-threads", chosen.wide)):
        own = text.split(f"{flag} ", 1)[1].split(" [env ", 1)[0]
        assert f"0 = chosen from the cores and logged: {value} here, on 16 cores" in own, flag
