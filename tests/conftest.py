"""Suite-wide pytest hooks: keep the fast lane fast.

The fast lane is `pytest -m "not slow"` (under a minute on 2 cores); the full suite runs every
test. A test that is not marked slow but takes longer than SLOW_SECONDS is named at the end of the
run, so it can be marked or shrunk. Nothing here asserts on time: a busy machine only gets a note.
"""

from __future__ import annotations

import pytest

SLOW_SECONDS = 5.0


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_unmarked_key] = []


_unmarked_key = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.duration > SLOW_SECONDS and item.get_closest_marker("slow") is None:
        item.config.stash[_unmarked_key].append((report.duration, item.nodeid))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    unmarked = config.stash.get(_unmarked_key, [])
    if unmarked:
        terminalreporter.section("tests over %.0f s without @pytest.mark.slow" % SLOW_SECONDS)
        for seconds, nodeid in sorted(unmarked, reverse=True):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
