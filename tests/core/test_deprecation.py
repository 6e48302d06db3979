"""Old module paths: a shim makes ``import old`` give the new module, warning
with the new path, at the importer's line."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest

import remotedialer
from remotedialer.deprecation import MOVED, alias_module

SHIM = 'from remotedialer.deprecation import alias_module\n\nalias_module(__name__, "{new}")\n'


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """A throwaway package ``movedpkg`` with ``new.py`` and a shim ``old.py``."""
    root = tmp_path / "movedpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "new.py").write_text("VALUE = 42\n")
    (root / "old.py").write_text(SHIM.format(new="movedpkg.new"))
    sys.path.insert(0, str(tmp_path))
    try:
        yield root
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.split(".")[0] == "movedpkg"]:
            del sys.modules[name]


def test_the_old_path_gives_the_new_module_with_a_warning(package: Path) -> None:
    expected = r"movedpkg\.old is deprecated: import movedpkg\.new"
    with pytest.warns(DeprecationWarning, match=expected) as caught:
        import movedpkg.old  # type: ignore[import-not-found]  # noqa: F401
    new = importlib.import_module("movedpkg.new")
    assert sys.modules["movedpkg.old"] is new
    assert importlib.import_module("movedpkg.old") is new
    # the warning points at the line that imported the old path, not the shim
    assert [warning.filename for warning in caught] == [__file__]


def test_from_import_of_the_old_path_gives_the_new_module(package: Path) -> None:
    with pytest.warns(DeprecationWarning):
        from movedpkg import old
    assert old.VALUE == 42
    assert old is importlib.import_module("movedpkg.new")


def test_alias_module_on_its_own(package: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alias_module("movedpkg.elsewhere", "movedpkg.new")
    assert sys.modules["movedpkg.elsewhere"] is importlib.import_module("movedpkg.new")
    assert [str(warning.message) for warning in caught] == [
        "movedpkg.elsewhere is deprecated: import movedpkg.new instead"
    ]


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_every_moved_path_is_a_warning_shim(old: str, new: str) -> None:
    """Each old path of the re-layout is a three-line shim giving the module
    at its new path (run in a fresh interpreter: this one imported them)."""
    shim = Path(remotedialer.__file__).parent / (old.split(".", 1)[1].replace(".", "/") + ".py")
    assert len(shim.read_text(encoding="utf-8").splitlines()) == 3
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"assert old is importlib.import_module({new!r}), old\n"
        "messages = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
        f"assert messages == [{old + ' is deprecated: import ' + new + ' instead'!r}], messages\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_memory_transport_is_still_reachable_at_its_old_path() -> None:
    """``remotedialer.transport`` had the test doubles now in ``remotedialer.testing``."""
    from remotedialer import testing
    from remotedialer.transports import base

    with pytest.warns(DeprecationWarning, match="remotedialer.testing.memory_pair"):
        assert base.memory_pair is testing.memory_pair
    with pytest.warns(DeprecationWarning, match="remotedialer.testing.MemoryTransport"):
        assert base.MemoryTransport is testing.MemoryTransport
    with pytest.raises(AttributeError):
        base.no_such_name  # noqa: B018
