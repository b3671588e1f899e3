"""Every module imports on its own, and dependencies flow one way (issue 15, docs: DESIGN.md's layout):

    registries (leaves) <- models, tasks, data <- training, evaluate <- study <- report, cli

The layer of a module is given by the longest matching prefix in LAYERS; a module may import
modules of its own layer or lower ones, and no two modules may import each other, directly or
round a longer loop. Imports are read with ``ast``, including those inside functions (a lazy import
of a higher layer is still a dependency on it).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "pretextlab"

# module prefix -> layer (longest prefix wins). Old flat modules are listed beside the packages
# that replace them, so the table holds before, during and after the move.
LAYERS: dict[str, int] = {
    # 0: leaves: the error type, file writing, option plumbing, registries (import no implementation)
    "pretextlab": 0,
    "pretextlab.errors": 0,
    "pretextlab.atomic": 0,
    "pretextlab.options": 0,
    "pretextlab.devices": 0,
    "pretextlab.registry": 0,
    "pretextlab.models.registry": 0,
    # 1: what registers itself
    "pretextlab.models": 1,
    "pretextlab.tasks": 1,
    "pretextlab.data": 1,
    # 2: the recipe, training, evaluation
    "pretextlab.config": 2,
    "pretextlab.training": 2,
    "pretextlab.evaluate": 2,
    # 3: studies and their store
    "pretextlab.study": 3,
    "pretextlab.store": 3,
    # 4: what people run
    "pretextlab.report": 4,
    "pretextlab.demo": 4,
    "pretextlab.cli": 4,
    "pretextlab.__main__": 4,
}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int | None:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            # `from a import b` imports module a.b where there is one, else a name of a.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import a.b.thing` -> the deepest module a.b
                name = name.rpartition(".")[0]
            if name.startswith(PACKAGE) and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _libraries_at_module_level() -> list[str]:
    """The modules of other packages (the standard library's included) that the package imports at
    module level (not inside a function), and the names it imports from them (some are modules)."""
    found = set()
    for path in MODULES.values():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                # `from PIL import Image` loads the module PIL.Image; other names are not modules.
                found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return sorted(n for n in found if n.split(".")[0] not in (PACKAGE, "__future__"))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if _layer(m) is None], "add these modules to LAYERS"


def test_the_rule_sees_the_cycles_and_inversions_it_exists_for():
    # A registry importing its implementations, and a store importing its study: both caught.
    graph = {"a.registry": {"a.resnet"}, "a.resnet": {"a.registry"}, "a.store": {"a.study"}, "a.study": {"a.store"}, "a.cli": set()}
    assert _cycles(graph) == [["a.registry", "a.resnet"], ["a.store", "a.study"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _layer("pretextlab.models.registry") == 0 and _layer("pretextlab.models.resnet") == 1
    assert _layer("pretextlab.study.store") == 3 and _layer("pretextlab.report.tables") == 4


def test_dependencies_flow_one_way_and_no_module_imports_itself_round_a_loop():
    upward = sorted(
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(module) is not None and _layer(target) is not None and _layer(target) > _layer(module)
    )
    cycles = _cycles(GRAPH)
    assert not upward and not cycles, {"imports of a higher layer": upward, "import cycles": cycles}


@pytest.mark.slow  # ~3 CPU-s: one interpreter, then a cheap forked child per module
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    # One interpreter loads the libraries the package imports at module level once (torch,
    # matplotlib, the standard library's modules), then tests each module in a forked child that
    # starts as a fresh interpreter would reach that module: `import a.b.c` first imports a, then
    # a.b (whose __init__ runs whole), then a.b.c. So the children are a tree: a package's child
    # imports the package, then forks one grandchild per module or package inside it; each
    # grandchild starts exactly where a fresh `python -c "import a.b.c"` would be after importing
    # a.b, and pays only for its own module (a flat fork per module re-imported every package
    # __init__ each time: ~5.5 CPU-s of the old ~8). A library missing from the preload is left to
    # the child, which then fails as a fresh interpreter would. Where fork is missing, a fresh
    # interpreter per module.
    driver = textwrap.dedent(
        """
        import gc, os, sys, traceback, importlib
        preload, modules = sys.argv[1].split(","), sys.argv[2:]
        if hasattr(os, "fork"):
            for library in preload:  # not pretextlab: the children import that
                try:
                    importlib.import_module(library)
                except Exception:
                    pass
            inside, roots = {}, []  # package -> the modules and packages directly inside it
            for name in modules:
                parent = name.rpartition(".")[0]
                if parent in modules:
                    inside.setdefault(parent, []).append(name)
                else:  # the top package (or a module in a folder that is no package)
                    roots.append(name)

            def check(name):
                # Runs in a child whose parent package (and only what importing it pulled in) is loaded.
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    # What a fresh interpreter could not import either: the module and all inside it.
                    failed = [m for m in modules if m == name or m.startswith(name + ".")]
                    os.write(1, "".join(f"FAILED {m}\\n" for m in failed).encode())
                    sys.stderr.flush()
                    os._exit(1)
                # Without this each child's garbage collections walk (and so copy) every object
                # loaded so far: most of its CPU time. Frozen objects are left out of collections.
                gc.freeze()
                for child in inside.get(name, ()):
                    fork(child)
                os._exit(0)

            def fork(name):
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    check(name)
                os.waitpid(pid, 0)

            gc.freeze()
            for name in roots:
                fork(name)
            print("DONE")
        else:
            import subprocess
            for name in modules:
                if subprocess.run([sys.executable, "-c", f"import {name}"]).returncode:
                    print(f"FAILED {name}")
            print("DONE")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    importable = sorted(m for m in MODULES if not m.endswith(".__main__"))  # __main__ runs the command
    done = subprocess.run([sys.executable, "-c", driver, ",".join(_libraries_at_module_level()), *importable], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("DONE"), done.stderr[-3000:]
    failed = sorted({line.removeprefix("FAILED ") for line in done.stdout.splitlines() if line.startswith("FAILED ")})
    assert failed == [], f"these modules fail to import on their own: {failed}\n{done.stderr[-3000:]}"
