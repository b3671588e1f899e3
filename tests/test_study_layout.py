"""The study and report packages' shape: the store imports no study-file parsing (no store <-> study
cycle), every module says in one docstring line what it owns, and none is over ~400 lines."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pretextlab"


def test_the_store_loads_without_the_study_file_parsing_or_the_trainer():
    code = ("import sys, pretextlab.study.store; "
            "print(sorted(m for m in sys.modules if m.startswith('pretextlab') or m in ('yaml', 'torch')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(loaded) == ["pretextlab", "pretextlab.atomic", "pretextlab.errors", "pretextlab.study", "pretextlab.study.owners",
                            "pretextlab.study.store", "pretextlab.study.store_format", "pretextlab.study.store_snapshot"]


def test_store_modules_import_nothing_of_the_study_but_the_store():
    for name in ("store.py", "store_format.py"):
        tree = ast.parse((PACKAGE / "study" / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        study = {m for m in imported if m.startswith("pretextlab.study")}
        # owners.py (who holds a cell: host, pid, cluster job) and store_snapshot.py (a read-only
        # store's private copy) import the standard library alone.
        allowed = {"pretextlab.study.store_format", "pretextlab.study.owners", "pretextlab.study.store_snapshot"}
        assert study <= allowed, (name, study)
        assert "yaml" not in imported and "pretextlab.config" not in imported


def test_every_module_has_a_docstring_and_at_most_400_lines():
    modules = sorted((PACKAGE / "study").glob("*.py")) + sorted((PACKAGE / "report").glob("*.py"))
    assert len(modules) >= 15 and not (PACKAGE / "store.py").exists() and not (PACKAGE / "report.py").exists()
    for path in modules:
        text = path.read_text()
        docstring = ast.get_docstring(ast.parse(text))
        assert docstring and docstring.strip(), path
        assert len(text.splitlines()) <= 400, (path, len(text.splitlines()))
