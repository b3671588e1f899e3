"""A Ctrl-C or SIGTERM while a checkpoint is written: the checkpoint is completed first, then the stop
happens as between steps (README "What a fault leaves behind"). The signals are real ones, raised in
this process from inside torch.save's writes, so they land mid-write every time, with no timing luck."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from forked_cli import ForkedProcess
from pretextlab import atomic
from pretextlab.cli import main
from pretextlab.training.checkpoint import checkpoint_identity, load_checkpoint, write_checkpoint
from pretextlab.training.run_dir import RunFiles

class SignalOnWrite:
    """The file torch.save writes to, raising ``signum`` in this process at its ``at``-th write (the
    zip writer makes several: the pickle, then each tensor), then writing on. signal.raise_signal
    delivers to the calling thread before it returns, so the handler runs inside this write."""

    def __init__(self, handle: Any, signum: int, at: int) -> None:
        self.handle, self.signum, self.at, self.calls = handle, signum, at, 0

    def write(self, data: Any) -> int:
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(self.signum)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


@contextlib.contextmanager
def signal_during_next_save(signum: int, at: int = 3) -> Iterator[list[SignalOnWrite]]:
    """The next torch.save (only it) gets ``signum`` in the middle of its writes; yields [its writer]."""
    real, used = torch.save, []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        torch.save = real
        used.append(SignalOnWrite(f, signum, at))
        real(obj, used[0], *args, **kwargs)

    torch.save = save
    try:
        yield used
    finally:
        torch.save = real


def _state(step: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(step)
    return {"network": {"w": torch.randn(64, 64, dtype=torch.float64, generator=generator)},
            "task": {"b": torch.randn(8, dtype=torch.float64, generator=generator)}, "step": step, "total_steps": 9}


@pytest.fixture
def python_ctrl_c() -> Iterator[None]:
    """Python's own Ctrl-C handling (KeyboardInterrupt), whatever the test runner set up."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_the_checkpoint_write_completes_it_then_raises_keyboard_interrupt(tmp_path, python_ctrl_c):
    files = RunFiles(tmp_path)
    write_checkpoint(files, _state(1))
    with signal_during_next_save(signal.SIGINT) as writer:
        # Before the fix: "RuntimeError ... unexpected pos" from torch's zip writer, and no new checkpoint.
        with pytest.raises(KeyboardInterrupt):
            write_checkpoint(files, _state(2))
    assert writer[0].calls > writer[0].at  # the signal landed mid-write and the write went on to the end

    state, identity = load_checkpoint(tmp_path)
    assert state is not None and identity.step == 2 and identity.file == "checkpoint.pt"
    assert torch.equal(state["network"]["w"], _state(2)["network"]["w"])
    # The sidecar written after the save is there and names these bytes.
    assert identity.sha256 == hashlib.sha256(files.checkpoint.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2
    previous = torch.load(files.previous_checkpoint, weights_only=True)
    assert previous["step"] == 1 and torch.equal(previous["network"]["w"], _state(1)["network"]["w"])
    assert not list(tmp_path.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_a_handler_the_program_installed_is_left_to_act_during_the_write(tmp_path):
    """The trainer's SIGTERM handler only asks for a stop after the step; it stays installed (so
    study/cell_job.py still sees the trainer running) and runs when the signal comes."""
    seen: list[bool] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signal.getsignal(signal.SIGTERM) is handler))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with signal_during_next_save(signal.SIGTERM):
            atomic.save_torch(tmp_path / "weights.pt", _state(3))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [True]
    assert torch.load(tmp_path / "weights.pt", weights_only=True)["step"] == 3


def test_sigterm_with_its_default_action_ends_the_process_only_once_the_file_is_whole(tmp_path):
    """No handler: SIGTERM would end the process mid-write (a torn temporary file beside the old
    one); held, the new file takes its place first. A forked child, so only it is terminated."""
    target = tmp_path / "weights.pt"
    atomic.save_torch(target, _state(4))
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            with signal_during_next_save(signal.SIGTERM):
                atomic.save_torch(target, _state(5))
        finally:
            os._exit(3)  # reached only if SIGTERM did not end the child
    deadline = time.monotonic() + 60
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not finish")
        time.sleep(0.01)
    assert os.WIFSIGNALED(waited[1]) and os.WTERMSIG(waited[1]) == signal.SIGTERM
    assert torch.load(target, weights_only=True)["step"] == 5
    assert not list(tmp_path.glob(".*.tmp"))


def _train_with_ctrl_c_in_the_first_save() -> int:
    # The child has Python's own Ctrl-C handling (forked_cli.py), even under a shell's SIG_IGN.
    with signal_during_next_save(signal.SIGINT):  # the first save: step 1's, mid-epoch
        return main(sys.argv[1:])


@pytest.mark.slow
def test_pretextlab_train_given_ctrl_c_inside_a_checkpoint_write_exits_130_with_that_checkpoint(tmp_path):
    run = tmp_path / "run"
    # A real process (the exit status is the point) forked from this one, which has torch imported.
    done = ForkedProcess(_train_with_ctrl_c_in_the_first_save, argv=[
        "train", "--task", "rotation", "--network", "resnet50v1",
        "--width", "1", "--limit", "48", "--val-size", "16", "--test-limit", "16", "--epochs", "1",
        "--batch-size", "16", "--color-jitter", "0", "--device", "cpu", "--val-batches", "1", "--no-progress",
        "--checkpoint-every", "1", "--out", str(run)])
    stdout, stderr = done.communicate(timeout=120)
    assert done.returncode == 130, stderr
    assert "interrupted; finished work is kept" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert checkpoint_identity(run).step == 1  # the checkpoint the signal landed in, whole and identified
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not list(Path(run).glob(".*.tmp"))
