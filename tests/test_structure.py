"""The package's shape: no import cycles between its modules, no function, class or module too
large to read, and a command line that explains every option."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from fractalgen.cli import build_parser

PACKAGE = Path(__file__).resolve().parents[1] / "fractalgen"
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 100, 250, 600


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions alike (a
    lazy import is still a dependency). ``from . import x`` counts as importing module ``x`` when
    it exists, otherwise the package's ``__init__``."""
    modules = {path.stem for path in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 0 and not (node.module or "").startswith(package.name):
                    continue
                target = (node.module or "").removeprefix(package.name).lstrip(".").split(".")[0]
                if target:
                    edges.add(target)
                else:  # from . import a, b
                    edges.update(a.name if a.name in modules else "__init__" for a in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package.name:
                        edges.add(parts[1] if len(parts) > 1 else "__init__")
        graph[path.stem] = {e for e in edges if e in modules and e != path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_sees_lazy_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("import os\n")
    (package / "a.py").write_text("from .low import x\nfrom . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import g\n")
    assert find_cycle(import_graph(package)) == ["a", "b", "a"]
    (package / "b.py").write_text("from pkg.low import x\n")
    assert find_cycle(import_graph(package)) is None


def test_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert {"cli", "model", "checkpoint", "persistence"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def oversized(package: Path) -> list[str]:
    """Functions, classes and modules over the limits, as 'file: what (lines)'."""
    found = []
    for path in sorted(package.glob("*.py")):
        source = path.read_text()
        if (lines := len(source.splitlines())) > MAX_MODULE:
            found.append(f"{path.name}: module ({lines} lines)")
        for node in ast.walk(ast.parse(source)):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if (lines := node.end_lineno - node.lineno + 1) > limit:
                    found.append(f"{path.name}: {node.name} ({lines} lines)")
    return found


def test_size_check_sees_long_functions(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION)
    assert oversized(tmp_path) == [f"m.py: f ({MAX_FUNCTION + 1} lines)"]


def test_no_unit_exceeds_the_size_limits():
    assert oversized(PACKAGE) == []


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every leaf subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, f"{prefix} {name}".strip())
            return
    yield prefix, parser


@pytest.mark.parametrize("command", [name for name, _ in _subcommands(build_parser())])
def test_every_option_has_help(command):
    parser = dict(_subcommands(build_parser()))[command]
    missing = [action.option_strings[0] if action.option_strings else action.dest for action in parser._actions
               if not action.help]
    assert missing == [], f"fractalgen {command}: options without help text: {missing}"
