"""The package's structure: its layers (docs/contributing.rst), checked from
the source. No module imports, at run time, from a layer above its own; no
import cycles between modules (imports under ``if TYPE_CHECKING:`` do not
count for either: they never run); no private names imported from another
module; no ``__all__`` name that is not defined. The old module paths
(:data:`remotedialer.deprecation.MOVED`) are three-line shims that nothing in
the package imports, exempt from the rest."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from remotedialer.deprecation import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "remotedialer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


ALL_MODULES: Dict[str, Path] = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
SHIMS = {name: path for name, path in ALL_MODULES.items() if name in MOVED}
"""The old module paths, each only an ``alias_module`` call."""
MODULES: Dict[str, Path] = {name: path for name, path in ALL_MODULES.items() if name not in SHIMS}
"""Every real module of the package."""

# ------------------------------------------------------------------ layers
LAYERS = ["core", "transports", "client and server", "ha, metrics, integrations", "gateway", "app", "cli"]
"""The package's layers, lowest first (docs/contributing.rst). A module may
import, at run time, only from its own layer or lower ones."""

LAYER_OF_PACKAGE = {
    "remotedialer.transports": 2,
    "remotedialer.client": 3,
    "remotedialer.server": 3,
    "remotedialer.ha": 4,
    "remotedialer.metrics": 4,
    "remotedialer.integrations": 4,
    "remotedialer.gateway": 5,
    "remotedialer.app": 6,
    "remotedialer.examples": 6,
    "remotedialer.workers": 6,
    "remotedialer.cli": 7,
}
"""Layers by package (or module) prefix, numbered from 1 (``LAYERS[0]``);
every other top-level module is the tunnel core (layer 1)."""

ROOT_LAYER = len(LAYERS) + 1
"""The package root re-exports every layer (and plugs peering into the server):
above them all."""


def layer_of(module: str) -> int:
    """The layer (1 = core) of a package module, by its name."""
    if module == "remotedialer":
        return ROOT_LAYER
    for prefix, layer in LAYER_OF_PACKAGE.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    assert module.count(".") == 1, f"{module}: a subpackage without a layer (add it to LAYER_OF_PACKAGE)"
    return 1


FORBIDDEN = [("remotedialer.server", "remotedialer.client")]
"""Imports ruled out inside one layer: the server side never imports the agent."""


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
        is_package = ALL_MODULES[module].name == "__init__.py"
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [alias.name for alias in node.names]
    # ``from . import frames`` imports a module, not a name
    submodules = [(f"{target}.{name}", []) for name in names if f"{target}.{name}" in ALL_MODULES]
    return [(target, names)] + submodules


def runtime_edges(module: str, tree: ast.AST) -> Set[str]:
    """The package modules ``module`` imports at run time. Its own parent
    packages do not count: Python imports them before the module anyway
    (``from . import heartbeat`` loads ``heartbeat``, not the package)."""
    edges = set()
    for node in runtime_imports(tree):
        for target, _names in imported(module, node):
            if target in ALL_MODULES and target != module and not module.startswith(target + "."):
                edges.add(target)
    return edges


def import_graph() -> Dict[str, Set[str]]:
    return {
        module: runtime_edges(module, ast.parse(path.read_text(encoding="utf-8")))
        for module, path in MODULES.items()
    }


def layer_violations(graph: Dict[str, Set[str]]) -> List[str]:
    """Every edge of ``graph`` that runs up the layers, or that
    :data:`FORBIDDEN` rules out."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                found.append(
                    f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
                )
            found += [
                f"{module} imports {target}: {low} never imports {high}"
                for low, high in FORBIDDEN
                if module.startswith(low) and (target == high or target.startswith(high + "."))
            ]
    return found


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


def test_every_module_has_a_layer() -> None:
    assert {module: layer_of(module) for module in MODULES}  # layer_of asserts


def test_imports_run_down_the_layers() -> None:
    """No module imports from a layer above its own at run time (see
    :data:`LAYERS`; imports under ``if TYPE_CHECKING:`` aside), and the server
    side never imports the agent (:data:`FORBIDDEN`)."""
    assert layer_violations(import_graph()) == []


def test_the_layer_check_catches_an_upward_import() -> None:
    """Synthetic cases: the check fails on a violating import, from source."""
    session = "remotedialer.session"
    upward = runtime_edges(session, ast.parse("from .server.tunnel_server import Server\n"))
    assert upward == {"remotedialer.server.tunnel_server"}
    assert layer_violations({session: upward}) == [
        "remotedialer.session (layer 1) imports remotedialer.server.tunnel_server (layer 3)"
    ]
    # the same import for types only is fine, and so is one down the layers
    type_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .server import Server\n"
    assert runtime_edges(session, ast.parse(type_only)) == set()
    assert layer_violations({"remotedialer.ha.peering": {"remotedialer.server.sessions"}}) == []
    # one inside a function still runs
    wsgi = "remotedialer.transports.wsgi"
    lazy = runtime_edges(wsgi, ast.parse("def f():\n    from ..ha import peering\n"))
    assert layer_violations({wsgi: lazy}) == [
        "remotedialer.transports.wsgi (layer 2) imports remotedialer.ha (layer 4)",
        "remotedialer.transports.wsgi (layer 2) imports remotedialer.ha.peering (layer 4)",
    ]
    assert layer_violations({"remotedialer.server.tunnel_server": {"remotedialer.client"}}) == [
        "remotedialer.server.tunnel_server imports remotedialer.client: "
        "remotedialer.server never imports remotedialer.client"
    ]
    assert runtime_edges(session, ast.parse("from . import heartbeat\n")) == {"remotedialer.heartbeat"}


def test_old_paths_are_shims_that_nothing_imports() -> None:
    """Each old path is a three-line ``alias_module`` shim listed in MOVED
    (tests/core/test_deprecation.py checks that each warns), and no module of
    the package imports one, even for types."""
    assert sorted(SHIMS) == sorted(MOVED)
    for name, path in SHIMS.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 3 and lines[2] == f'alias_module(__name__, "{MOVED[name]}")', name
    offences = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [target for target, _ in imported(module, node)]
                offences += [f"{module} imports {target}" for target in targets if target in SHIMS]
    assert offences == []


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
                        if name.startswith("_") and name != "__version__" and target in ALL_MODULES
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
