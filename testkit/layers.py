"""The package's layers and its import graph, read from the source.

``tests/test_imports.py`` checks the layering with these (no runtime import up
the layers, no cycles, no private names across modules), and the docs'
``remotedialer-layers`` directive (docs/conf.py) lists the graph on the
contributing page, so that neither can drift from the code.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

from remotedialer.deprecation import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "remotedialer"
"""The package's source folder."""


def module_name(path: Path) -> str:
    """The dotted name of the package module at ``path``."""
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
    """Every real module -> the package modules it imports at run time."""
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


def group_of(module: str) -> str:
    """The part of the package ``module`` belongs to, as the layout page
    shows it: ``core`` for the core's modules, else its folder or its
    top-level module (``server``, ``client``, ``cli``, ...)."""
    if layer_of(module) == 1:
        return "core"
    return module.split(".")[1] if module != "remotedialer" else "remotedialer"


def group_graph() -> Dict[str, Set[str]]:
    """:func:`import_graph` between the parts of the package (imports inside
    one part left out); the package root is left out too."""
    groups: Dict[str, Set[str]] = {}
    for module, targets in import_graph().items():
        if module == "remotedialer":
            continue
        edges = groups.setdefault(group_of(module), set())
        edges.update(group_of(target) for target in targets if target != "remotedialer")
        edges.discard(group_of(module))
    return groups
