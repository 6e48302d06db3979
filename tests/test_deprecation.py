"""Old module paths: a shim makes ``import old`` give the new module, warning
with the new path, at the importer's line."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from remotedialer.deprecation import alias_module

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
