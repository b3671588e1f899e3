"""tests/forked_cli.py ends a forked child as a fresh `python -m pretextlab` would end: the tests that
use it in place of a subprocess rely on that (exit codes, streams, signals, environment)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import pytest
import torch  # noqa: F401  (imported before the forks, as in every test that forks a command)

from forked_cli import ForkedCli, ForkedProcess


def _child_raises() -> None:
    raise ValueError("planted")


def _child_prints() -> int:
    print("out", os.environ["FORKED_CLI_PROBE"], os.getcwd(), sys.argv[1:])
    print("err", file=sys.stderr)
    return 3


def _child_sleeps() -> None:
    print("ready", flush=True)
    time.sleep(60)


def _child_exits_with_message() -> None:
    raise SystemExit("a message")


def _child_hits_ctrl_c() -> None:
    raise KeyboardInterrupt


def _child_warns() -> None:
    logging.getLogger("pretextlab.somewhere").warning("a warning")
    logging.getLogger("pretextlab.somewhere").info("not shown at the default level")


def test_streams_code_environment_and_directory_are_the_childs_own(tmp_path):
    env = {**os.environ, "FORKED_CLI_PROBE": "seen"}
    child = ForkedProcess(_child_prints, argv=["a", "b"], env=env, cwd=tmp_path)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 3
    assert out == f"out seen {tmp_path} ['a', 'b']\n" and err == "err\n"
    assert "FORKED_CLI_PROBE" not in os.environ and os.getcwd() != str(tmp_path)  # the parent is untouched


@pytest.mark.parametrize(("target", "code", "in_stderr"), [
    (_child_raises, 1, "ValueError: planted"),
    (_child_exits_with_message, 1, "a message"),
    (_child_hits_ctrl_c, -signal.SIGINT, "KeyboardInterrupt"),
])
def test_the_child_ends_as_an_interpreter_ends(target, code, in_stderr):
    child = ForkedProcess(target)
    _, err = child.communicate(timeout=30)
    assert child.returncode == code and in_stderr in err


def test_logging_is_a_fresh_interpreters_so_warnings_reach_the_childs_stderr(caplog):
    caplog.set_level(logging.DEBUG)  # pytest's capturing handler, on the root logger, at DEBUG here
    child = ForkedProcess(_child_warns)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 0 and err == "a warning\n"


def test_signals_reach_the_child_with_their_default_effect():
    child = ForkedProcess(_child_sleeps)
    deadline = time.monotonic() + 30
    while "ready" not in child.stdout_text():
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == -signal.SIGTERM


def test_a_pretextlab_command_exits_with_the_clis_code_and_message(tmp_path):
    child = ForkedCli(["train", "--task", "no-such-task", "--out", str(tmp_path / "run")])
    _, err = child.communicate(timeout=60)
    assert child.returncode == 2 and "no-such-task" in err
