"""The package's import graph: no circles, configuration below the model, a light data path.

The graph is read from the source with ``ast``: an edge A -> B for every
module-level ``import``/``from ... import`` of a ropelm module B in module A
(imports inside functions and under ``if TYPE_CHECKING:`` do not run at import
time and are left out; so is the implicit import of a parent package, which
Python has already started when a submodule runs). A subprocess then checks
what importing the data path really loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"ropelm": ROOT / "ropelm", "ropelm.plugins": ROOT / "plugins"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for the core package and the built-in plugins."""
    files = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def top_level_imports(tree: ast.Module, module: str, known: set[str]) -> set[str]:
    """The ropelm modules ``module`` imports when it is imported."""
    found: set[str] = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            statements += node.body + node.orelse
        elif isinstance(node, ast.Try):
            statements += node.body + node.orelse + node.finalbody
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from ropelm.cli import run`` imports the submodule ropelm.cli.run
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known and name != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {
        name: top_level_imports(ast.parse(path.read_text(encoding="utf-8")), name, set(files))
        for name, path in files.items()
    }


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for child in graph[stack.pop()]:
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for root in graph:
        if colour[root]:
            continue
        path, iterators = [root], [iter(sorted(graph[root]))]
        colour[root] = 1
        while iterators:
            child = next(iterators[-1], None)
            if child is None:
                colour[path.pop()] = 2
                iterators.pop()
            elif colour[child] == 1:
                return [*path[path.index(child) :], child]
            elif colour[child] == 0:
                colour[child] = 1
                path.append(child)
                iterators.append(iter(sorted(graph[child])))
    return None


def test_the_graph_is_read_from_every_module(graph):
    assert {"ropelm.config", "ropelm.model", "ropelm.engine", "ropelm.plugins.rope_sm"} <= set(
        graph
    )
    assert "ropelm.config" in graph["ropelm.model"]  # an edge the rest relies on


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_through_others(graph):
    assert find_cycle(graph) is None


def test_configuration_sits_below_the_model_and_the_registry(graph):
    assert reachable(graph, "ropelm.config") <= {"ropelm", "ropelm.errors", "ropelm.hookspecs"}
    for above in ("ropelm.attention", "ropelm.model", "ropelm.registry", "ropelm.engine"):
        assert "ropelm.config" in reachable(graph, above), above


@pytest.mark.parametrize(
    "module", ["ropelm.tokenizer", "ropelm.data", "ropelm.sources", "ropelm.cache"]
)
def test_the_data_path_imports_no_model_code(graph, module):
    model_code = {"ropelm.model", "ropelm.attention", "ropelm.registry", "ropelm.rope"}
    loaded = reachable(graph, module)
    assert not loaded & model_code
    assert not any(name.startswith("ropelm.plugins") for name in loaded)


def test_importing_configuration_and_tokenizer_loads_no_torch():
    code = (
        "import sys, ropelm.config, ropelm.tokenizer\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import ropelm.data\n"
        "bad = [m for m in sys.modules if m.startswith(('ropelm.model', 'ropelm.registry', "
        "'ropelm.attention', 'ropelm.plugins'))]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
