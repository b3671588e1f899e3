"""The source tree's shape (issue 15's "Done when"): every module opens with a docstring saying
what it owns, and no module is over 400 lines (a longer one does more than one job: split it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pretextlab"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_opens_with_a_docstring_and_does_one_job(path):
    source = path.read_text()
    docstring = ast.get_docstring(ast.parse(source, str(path)))
    assert docstring and docstring.strip(), f"{path.relative_to(PACKAGE)} has no module docstring: say what it owns"
    assert len(source.splitlines()) <= MAX_LINES, (
        f"{path.relative_to(PACKAGE)} has {len(source.splitlines())} lines (over {MAX_LINES}): split it by job"
    )
