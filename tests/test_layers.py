"""The import graph of `controller/` and `agent/`: layers that hold, no import circles.

Every module is read with `ast` (nothing is imported). Module A depends on module B for
every import statement of A that names B; `from pkg import name` names the module
`pkg.name` when that is a module of ours, else `pkg`. A package's `__init__` is the
module `pkg`; importing `pkg.sub` is a dependency on `pkg.sub` only (that Python also
runs `pkg/__init__.py` first is not a dependency of the importer's design).

Which imports count (the decision this test documents):

- **module level** (run when the module is imported, also inside a top-level `try` or
  `if`): they must be acyclic, no exception;
- **function level** (lazy imports inside functions and methods) count as well: a lazy
  import hides a circle from the interpreter, not from the reader, so the graph of
  module-level and function-level imports together must be acyclic too;
- imports under `if TYPE_CHECKING:` do not count for circles: they never run and only
  name types for annotations (a mixin naming the class that combines it). They do count
  for the layer rules: `controller` may not even name an `agent` type.

Layer rules: no module under `controller` imports `agent`; no module under `agent`
imports `controller.server` or `controller.store` (the agent reaches the control plane
through `controller.connect`, which opens the Backend a URL names).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("controller", "agent")

#: The only circles through lazy (function-level) imports that remain, each a set of
#: modules. Module-level
#: circles have no exceptions. A listed circle that disappears fails the test until it
#: is removed from here, so this list only shrinks.
KNOWN_LAZY_CIRCLES: frozenset[frozenset[str]] = frozenset({
    # Step SDK: `Logger.current_logger()` and `OutputModel(task=None)` (reference API)
    # find the current Task lazily, while Task makes Loggers and OutputModels.
    frozenset({"controller.sdk.task", "controller.sdk.logger", "controller.sdk.output_model"}),
})


@dataclass(frozen=True)
class Import:
    """One dependency: `source` names `target`; `level` is module, function or type_checking."""

    source: str
    target: str
    level: str
    line: int


def module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with its level: module, function or type_checking."""

    def walk(node: ast.AST, level: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, level
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, "type_checking" if level == "type_checking" else "function")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), "type_checking")
                for statement in child.orelse:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), level)
            else:
                yield from walk(child, level)

    yield from walk(tree, "module")


def _our_module(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The dependencies of one module on modules of ours."""
    found = []
    is_package = path.name == "__init__.py"
    for node, level in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        for name in names:
            target = _our_module(name, modules)
            if target is not None and target != module:
                found.append(Import(module, target, level, node.lineno))
    return found


@functools.cache
def import_graph() -> tuple[Import, ...]:
    """Every dependency between modules of the packages (read once per test run)."""
    modules = module_files()
    return tuple(imp for module, path in modules.items() for imp in imports_of(module, path, modules))


def circles(edges: list[Import] | tuple[Import, ...]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in edges:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(circle: frozenset[str], edges: list[Import] | tuple[Import, ...]) -> str:
    """The imports inside one circle, one per line, for a failure message."""
    inside = sorted(
        {imp for imp in edges if imp.source in circle and imp.target in circle},
        key=lambda imp: (imp.source, imp.target, imp.line),
    )
    return "\n".join(f"  {i.source}:{i.line} -> {i.target} ({i.level})" for i in inside)


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ----------------------------------------------------------------------------- tests
def test_the_graph_sees_the_packages_and_their_imports() -> None:
    edges = import_graph()
    sources = {imp.source for imp in edges}
    assert {"controller.connect", "controller.pipeline.running", "agent.cli", "agent.executor"} <= sources
    pairs = {(imp.source, imp.target, imp.level) for imp in edges}
    assert ("controller.connect", "controller.backend", "module") in pairs
    assert ("controller.connect", "controller.store", "function") in pairs  # when a URL asks for it
    assert ("controller.pipeline.running", "controller.pipeline.controller", "type_checking") in pairs


def test_controller_never_imports_agent() -> None:
    offending = [imp for imp in import_graph()
                 if _in_package(imp.source, "controller") and _in_package(imp.target, "agent")]
    assert offending == [], "\n".join(f"{i.source}:{i.line} imports {i.target} ({i.level})" for i in offending)


def test_agent_never_imports_the_server_or_the_store() -> None:
    offending = [
        imp for imp in import_graph()
        if _in_package(imp.source, "agent")
        and (_in_package(imp.target, "controller.server") or _in_package(imp.target, "controller.store"))
    ]
    assert offending == [], "\n".join(f"{i.source}:{i.line} imports {i.target} ({i.level})" for i in offending)


def test_the_backend_interface_imports_no_implementation() -> None:
    targets = {imp.target for imp in import_graph() if imp.source == "controller.backend"}
    assert not any(_in_package(t, "controller.store") or t == "controller.client" for t in targets), targets


def test_module_level_imports_make_no_circle() -> None:
    edges = [imp for imp in import_graph() if imp.level == "module"]
    found = circles(edges)
    assert found == [], "import circles:\n" + "\n\n".join(describe(c, edges) for c in found)


def test_module_and_function_level_imports_make_no_circle() -> None:
    edges = [imp for imp in import_graph() if imp.level in ("module", "function")]
    found = circles(edges)
    unexpected = [c for c in found if c not in KNOWN_LAZY_CIRCLES]
    assert unexpected == [], "import circles:\n" + "\n\n".join(describe(c, edges) for c in unexpected)
    gone = KNOWN_LAZY_CIRCLES - set(found)
    assert not gone, f"no longer circles, remove from KNOWN_LAZY_CIRCLES: {[sorted(c) for c in gone]}"
