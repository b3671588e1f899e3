"""`pretextlab` commands in real child processes forked from the test process.

Why: a fresh `python -m pretextlab` spends ~2.5 CPU-s importing torch and torchvision before it
does anything, and the suite starts dozens of them; the test process has imported both already,
so a child forked from it starts in milliseconds (the zygote / forkserver-preload pattern;
multiprocessing's "forkserver" cannot be used here because it would re-run the CLI through
pickling, and the child must be a plain process a test can signal).

The child is a real process: its own pid, the signals it is sent, its own stdout and stderr
(files, read back by communicate()), its exit status exactly as `python -m pretextlab` would end
(the code main() returns or SystemExit carries; an uncaught exception prints its traceback and
exits 1; an uncaught KeyboardInterrupt ends it by SIGINT, as the interpreter does). Its signal
dispositions, environment, working directory and torch thread count are reset to a fresh
interpreter's first, and it runs with one intra-op thread (see _run_child). What it does not exercise is the interpreter start itself and the
`python -m pretextlab` entry: tests/test_run_dir_faults.py runs those as real subprocesses.

The interface is the part of subprocess.Popen the tests use (pid, poll, wait, communicate,
send_signal, kill, returncode), so a test switches by changing the constructor.
"""

from __future__ import annotations

import faulthandler
import functools
import io
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


@functools.cache
def preload() -> None:
    """Imports, in this process, what a pretextlab command, a training or a DDP rank imports lazily
    on first use, so every forked child inherits it instead of importing it again (~1 CPU-s per
    child): the CLI's whole parser (each subcommand's options, the evaluate modules among them),
    torchvision's datasets (which bring torch._dynamo, also imported by the first optimizer) and
    TensorBoard's writer. Once per process (cached); a fork inherits that it ran."""
    import torch._dynamo  # noqa: F401
    import torchvision.datasets  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    from pretextlab.cli import build_parser

    build_parser()


class ForkedProcess:
    """``target()`` in a child forked from this process, ended as an interpreter running it as its
    main program would end (see the module docstring); ``argv`` is the child's sys.argv[1:]."""

    def __init__(self, target: Callable[[], int | None], *, argv: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None):
        self.args = [str(a) for a in argv]
        preload()
        self._folder = tempfile.TemporaryDirectory(prefix="forked-cli-")
        self._out = Path(self._folder.name) / "stdout"
        self._err = Path(self._folder.name) / "stderr"
        self.returncode: int | None = None
        environment = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
        # Flush this process's buffers so nothing written before the fork is written twice.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _run_child(target, self.args, environment, cwd, self._out, self._err)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"forked {' '.join(self.args[:2])} (pid {self.pid}) still running after {timeout} s")
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Waits for the child; (stdout, stderr) as text."""
        self.wait(timeout)
        return self.stdout_text(), self.stderr_text()

    def stdout_text(self) -> str:
        return self._out.read_text() if self._out.exists() else ""

    def stderr_text(self) -> str:
        return self._err.read_text() if self._err.exists() else ""

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self) -> None:
        # A child a failed test left running must not outlive the suite.
        if getattr(self, "returncode", 0) is None and getattr(self, "pid", None):
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


class ForkedCli(ForkedProcess):
    """``pretextlab ARGS`` in a child forked from this process (see the module docstring)."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None):
        from pretextlab.cli import main  # loaded by preload() in this process, not in every child

        argv = [str(a) for a in args]
        super().__init__(lambda: main(argv), argv=argv, env=env, cwd=cwd)


def _run_child(target: Callable[[], int | None], args: list[str], env: dict[str, str], cwd: str | Path | None,
               out: Path, err: Path) -> None:
    code: int = 1
    try:
        # A fresh interpreter's signal handling (pytest and its workers change some of it).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(number, signal.SIG_DFL)
        if faulthandler.is_enabled():
            faulthandler.disable()
        # A fresh interpreter's logging: a root logger without handlers at WARNING, so warnings reach
        # the child's stderr through logging's last resort (pytest's capturing handlers would swallow them).
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, out), (2, err)):
            opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        # New text streams on the new descriptors (the test process's streams are pytest's captures).
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=False)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["pretextlab", *args]
        if cwd is not None:
            os.chdir(cwd)
        # One intra-op thread, as every test's child process had (OMP_NUM_THREADS=1): GNU OpenMP
        # cannot start a new thread pool in a child forked after its parent used one (it hangs),
        # which is also why torch's DataLoader workers run single-threaded. A parent without torch
        # gives a child that imports it itself, reading OMP_NUM_THREADS=1 (and gaining nothing by
        # the fork: fork from a test module that imports torch).
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        result = target()
        code = 0 if result is None else int(result)
    except SystemExit as ended:
        if ended.code is None:
            code = 0
        elif isinstance(ended.code, int):
            code = ended.code
        else:
            print(ended.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _flush()
        os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
