"""README.rst's two newcomer commands, and .ci/run running the second one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> List[str]:
    """The literal blocks (``::`` paragraphs) at the top of README.rst, in order."""
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    return [block.strip() for block in re.findall(r"::\n\n    (.+)\n", text)]


def test_readme_starts_with_the_demo_then_the_test_command() -> None:
    demo, tests = readme_commands()[:2]
    assert demo.startswith("python3 -m venv .venv && ") and demo.endswith("remotedialer demo")
    assert "pip install -e '.[test]'" in tests and tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    tests = readme_commands()[1]
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert tests in ci_lines


def test_the_python_versions_agree() -> None:
    """README.rst's "Python 3.N+", setup.cfg's ``python_requires`` and the
    oldest version its classifiers name (which .ci/run tests, with the
    newest) are the same."""
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    promised = re.search(r"with Python (3\.\d+)\+", readme)
    required = re.search(r"python_requires = >=(3\.\d+)", setup)
    named = [int(minor) for minor in re.findall(r"Programming Language :: Python :: 3\.(\d+)", setup)]
    assert promised and required and named
    assert promised.group(1) == required.group(1) == f"3.{min(named)}"
    assert named == list(range(min(named), max(named) + 1)), "a version left out between the two"
    assert "classifiers" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_ci_builds_checks_and_installs_the_release_before_the_tests() -> None:
    """A release one could publish: .ci/run builds the sdist and the wheel,
    checks them as PyPI would, installs the wheel into a clean venv and runs
    it, all before the README's test command."""
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    tests = lines.index(readme_commands()[1])

    def first(fragment: str) -> int:
        found = [index for index, line in enumerate(lines) if fragment in line]
        assert found, f".ci/run has no line with {fragment!r}"
        return found[0]

    steps = [
        first(".release-venv/bin/python -m build"),
        first("twine check --strict dist/*"),
        first("python3 -m venv .wheel-venv"),
        first(".wheel-venv/bin/pip install -q dist/remotedialer-*.whl"),
        first(".wheel-venv/bin/remotedialer --help"),
    ]
    assert steps == sorted(steps) and steps[-1] < tests


def test_the_license_file_is_the_declared_license_and_ships() -> None:
    """setup.cfg declares Apache-2.0 and ships LICENSE (``license_files``),
    which holds that license's text; .ci/run checks that the sdist and the
    wheel it builds carry it."""
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert re.search(r"^license = Apache-2\.0$", setup, re.M)
    assert re.search(r"^license_files = LICENSE$", setup, re.M)
    words = (ROOT / "LICENSE").read_text(encoding="utf-8").split()
    assert words[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in " ".join(words)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'n.endswith("/LICENSE") for n in tarfile.open(sdist)' in ci
    assert 'n.endswith("/LICENSE") for n in zipfile.ZipFile(wheel)' in ci
