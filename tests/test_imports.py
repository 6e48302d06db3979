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
from typing import Iterator, List, Tuple

import pytest

from remotedialer.deprecation import MOVED
from testkit.layers import (
    ALL_MODULES,
    MODULES,
    PACKAGE,
    SHIMS,
    cycles,
    import_graph,
    imported,
    layer_of,
    layer_violations,
    runtime_edges,
    runtime_imports,
)

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


# ------------------------------------------------- tests import only testkit
def dotted_name(path: Path, root: Path) -> Tuple[str, bool]:
    """The dotted name of the file ``path`` below ``root`` (``tests/...``),
    and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imports_of_tests(module: str, is_package: bool, tree: ast.AST) -> List[str]:
    """Every module of ``tests`` that ``module`` imports (relative or
    absolute, at any depth, ``if TYPE_CHECKING:`` included), or loads with
    ``importlib.import_module`` / ``__import__`` by a literal name."""
    found = []
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                package = package[: max(len(package) - node.level + 1, 0)]
                base = ".".join(package + ([node.module] if node.module else []))
            # ``from . import test_requests`` imports a module by its name
            targets = [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        found += [target for target in targets if target == "tests" or target.startswith("tests.")]
    return found


def test_tests_import_no_other_test_module() -> None:
    """Test modules (and ``conftest.py`` files) import shared helpers from
    ``testkit`` only, never from another module under ``tests/``; fixtures
    they share are defined in a ``conftest.py`` (the helpers behind them in
    ``testkit``), which pytest loads by itself."""
    root = PACKAGE.parent
    offences = []
    for path in sorted((root / "tests").rglob("*.py")):
        module, is_package = dotted_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        offences += [f"{module} imports {target}" for target in imports_of_tests(module, is_package, tree)]
    assert offences == []


@pytest.mark.parametrize(
    "module, source, expected",
    [
        # the forms the suite used before testkit took the shared helpers
        ("tests.server.test_x", "from ..transports.test_wsgi import client_frame\n",
         ["tests.transports.test_wsgi"]),
        ("tests.integrations.test_x", "from . import test_requests as base\n",
         ["tests.integrations.test_requests"]),
        ("tests.integrations.test_x", "from .test_requests import Tunnel\n",
         ["tests.integrations.test_requests"]),
        ("tests.e2e.test_x", "from tests.e2e.test_e2e_peering import procs\n",
         ["tests.e2e.test_e2e_peering"]),
        ("tests.e2e.test_x", "import tests.support\n", ["tests.support"]),
        ("tests.e2e.test_x", "def f():\n    from ..server import test_faults\n", ["tests.server"]),
        ("tests.e2e.test_x", "from .conftest import files\n", ["tests.e2e.conftest"]),
        ("tests.core.test_x", "importlib.import_module('tests.core.test_y')\n", ["tests.core.test_y"]),
        # what is allowed
        ("tests.e2e.test_x", "from testkit.peering import Processes\nimport pytest\n", []),
        ("tests.e2e.test_x", "from remotedialer import frames\nimportlib.import_module('remotedialer')\n",
         []),
    ],
)
def test_the_tests_check_catches_a_test_module_import(module: str, source: str, expected: List[str]) -> None:
    """Synthetic cases: the check fails on a test module importing another."""
    assert imports_of_tests(module, False, ast.parse(source)) == expected
