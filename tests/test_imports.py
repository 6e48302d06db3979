"""The package's structure: no import cycles between its modules (imports
under ``if TYPE_CHECKING:`` do not count: they never run), no private names
imported from another module, no ``__all__`` name that is not defined."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "remotedialer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> Iterator[ast.stmt]:
    """Every import statement that can run (function-level ones included),
    skipping the bodies of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from runtime_imports(child)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from runtime_imports(node)


def imported(module: str, node: ast.stmt) -> List[Tuple[str, List[str]]]:
    """``(module, names)`` imported by ``node``, resolved to absolute names."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        is_package = MODULES[module].name == "__init__.py"
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [alias.name for alias in node.names]
    # ``from . import frames`` imports a module, not a name
    submodules = [(f"{target}.{name}", []) for name in names if f"{target}.{name}" in MODULES]
    return [(target, names)] + submodules


def import_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = graph.setdefault(module, set())
        for node in runtime_imports(tree):
            for target, _names in imported(module, node):
                if target in MODULES and target != module:
                    edges.add(target)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_are_skipped() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .server import Server\n"
        "def f():\n    from .session import Session\n"
    )
    targets = [
        target for node in runtime_imports(tree) for target, _ in imported("remotedialer.peering", node)
    ]
    assert targets == ["typing", "remotedialer.session"]


def test_no_import_cycles() -> None:
    """Package modules import each other in one direction only (a package
    ``__init__`` re-exporting its submodules is the usual exception, so the
    edges from a package to its own submodules are left out)."""
    graph = {
        module: {target for target in targets if not target.startswith(module + ".")}
        for module, targets in import_graph().items()
    }
    assert cycles(graph) == []


def test_no_private_names_imported_across_modules() -> None:
    offences = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for target, names in imported(module, node):
                    offences += [
                        f"{module} imports {target}.{name}"
                        for name in names
                        if name.startswith("_") and name != "__version__" and target in MODULES
                    ]
    assert offences == []


@pytest.mark.parametrize("module", sorted(name for name in MODULES if not name.endswith("__main__")))
def test_all_names_exist(module: str) -> None:
    loaded = importlib.import_module(module)
    missing = [name for name in getattr(loaded, "__all__", ()) if not hasattr(loaded, name)]
    assert missing == []


def test_no_fallbacks_for_typing_names() -> None:
    """``typing`` has everything the package uses on every supported Python
    (>= 3.9): no ``try: from typing import X / except ImportError`` left."""
    offences = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Try) and any(
                isinstance(child, ast.ImportFrom) and child.module in ("typing", "typing_extensions")
                for child in node.body
            ):
                offences.append(f"{module}:{node.lineno}")
    assert offences == []


def _top_level_imports(folder: Path) -> Iterator[Tuple[Path, str]]:
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                yield from ((path, alias.name.split(".")[0]) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                yield path, node.module.split(".")[0]


def test_tests_and_benchmarks_do_not_import_each_other() -> None:
    """The test suite drives the benchmarks as subprocesses; fixtures both
    need live in ``testkit``."""
    root = PACKAGE.parent
    offences = [
        f"{path.relative_to(root)} imports {name}"
        for folder, forbidden in (("tests", "benchmarks"), ("benchmarks", "tests"), ("testkit", "tests"))
        for path, name in _top_level_imports(root / folder)
        if name == forbidden
    ]
    assert offences == []
