"""The documentation builds without warnings and covers the code: every public
name has a docstring, every metric, limit and public module is on its page,
and every module logs below the ``remotedialer`` logger."""

from __future__ import annotations

import dataclasses
import html
import importlib
import inspect
import logging
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, List

import pytest
from sphinx.pycode import ModuleAnalyzer

import remotedialer
from remotedialer.config import Limits
from remotedialer.deprecation import MOVED
from remotedialer.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def public_module_names() -> List[str]:
    names = ["remotedialer"]
    for info in pkgutil.walk_packages(remotedialer.__path__, "remotedialer."):
        if not any(part.startswith("_") for part in info.name.split(".")) and info.name not in MOVED:
            names.append(info.name)  # old paths (MOVED) are the modules at their new ones
    return names


def public_modules() -> List[ModuleType]:
    return [importlib.import_module(name) for name in public_module_names()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the HTML docs once, with warnings as errors, into a temp dir."""
    out = tmp_path_factory.mktemp("docs-html")
    doctrees = tmp_path_factory.mktemp("docs-doctrees")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(doctrees), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    return out


def page_text(built: Path, page: str) -> str:
    """The visible text of a built page's article, whitespace collapsed."""
    raw = (built / page).read_text(encoding="utf-8")
    start, end = raw.find("<article"), raw.find("</article>")
    assert start >= 0 and end > start, f"no article in {page}"
    text = html.unescape(re.sub(r"<[^>]+>", " ", raw[start:end]))
    return re.sub(r"\s+", " ", text)


def test_docs_build_without_warnings(built: Path) -> None:
    for page in ("index", "quickstart", "concepts", "protocol", "deployment", "configuration",
                 "logging", "metrics", "compatibility", "benchmarks", "api", "contributing"):
        assert (built / f"{page}.html").is_file(), page


def test_pages_written_by_others_are_linked_once_they_exist(built: Path) -> None:
    index = (built / "index.html").read_text(encoding="utf-8")
    for page in ("requests", "forwarding"):
        if (DOCS / f"{page}.rst").exists():
            assert (built / f"{page}.html").is_file()
            assert f'href="{page}.html"' in index


def test_metrics_page_lists_every_metric_with_labels(built: Path) -> None:
    text = page_text(built, "metrics.html")
    for spec in METRICS:
        row = re.search(re.escape(spec.exposed_name()) + r" .*?" + re.escape(spec.help), text)
        assert row is not None, f"{spec.name} missing from the metrics page"
        for label in spec.labels:
            assert f" {label} " in row.group(0) or f" {label} ," in row.group(0), (spec.name, label)


def test_configuration_page_lists_every_limit(built: Path) -> None:
    text = page_text(built, "configuration.html")
    for field in dataclasses.fields(Limits):
        assert re.search(rf"\b{field.name} {re.escape(repr(field.default))}\b", text), field.name


def test_contributing_page_shows_the_layout_and_the_import_graph(built: Path) -> None:
    """The folder tree names every top-level module and subpackage; the
    generated table has every part with its layer and what it imports."""
    from testkit.layers import LAYERS, MODULES, group_graph, group_of, layer_of

    source = (DOCS / "contributing.rst").read_text(encoding="utf-8")
    tree = source[source.index(".. code-block:: text") : source.index(".. remotedialer-layers::")]
    for module in MODULES:
        parts = module.split(".")
        if len(parts) == 2:
            shown = f"{parts[1]}/" if MODULES[module].name == "__init__.py" else f"{parts[1]}.py"
            assert shown in tree, f"{module} is not in the folder tree of docs/contributing.rst"
    text = page_text(built, "contributing.html")
    graph = group_graph()
    rows = text.replace("core (the top-level modules)", "core")
    for module in MODULES:
        group, layer = group_of(module), layer_of(module)
        if module != "remotedialer":
            assert f"{group} {layer}: {LAYERS[layer - 1]}" in rows
    assert "core (the top-level modules) 1: core nothing" in text  # the core imports no other part
    assert graph.get("core") == set()


def test_api_page_documents_every_public_module(built: Path) -> None:
    raw = (built / "api.html").read_text(encoding="utf-8")
    for name in public_module_names():
        assert f'id="module-{name}"' in raw, f"{name} not in the API reference"
    for name in remotedialer.__all__:
        assert f">{name}<" in raw, f"remotedialer.{name} not in the API reference"


def _attribute_docs(module_name: str) -> Dict[str, List[str]]:
    docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    return {name: lines for (scope, name), lines in docs.items() if scope == "" and "".join(lines).strip()}


def _data_documented(module: ModuleType, name: str, attr_docs: Dict[str, Dict[str, List[str]]]) -> bool:
    """Whether constant ``name`` of ``module`` is documented where it is
    assigned: in ``module`` or in the module it was re-exported from."""
    if name in attr_docs.get(module.__name__, {}):
        return True
    obj = getattr(module, name)
    return any(
        name in attr_docs.get(other.__name__, {}) and getattr(other, name, None) is obj
        for other in public_modules()
        if other is not module and name in getattr(other, "__all__", ())
    )


@pytest.mark.skipif(
    not (importlib.import_module("remotedialer.session").__file__ or "").endswith(".py"),
    reason="the mypyc build's compiled modules carry no docstrings (mypyc drops them); "
    "the source's docstrings are checked on the pure-Python runs",
)
def test_every_public_name_has_a_docstring() -> None:
    """Classes and functions need their own docstring; constants and type
    aliases need a string (or ``#:`` comment) right after their assignment."""
    attr_docs = {module.__name__: _attribute_docs(module.__name__) for module in public_modules()}
    missing = []
    for module in public_modules():
        assert (module.__doc__ or "").strip(), f"{module.__name__} has no module docstring"
        exported = getattr(module, "__all__", None)
        if exported is None:
            # a package without __all__ must not be a namespace of public names
            assert not [n for n in vars(module) if not n.startswith("_")
                        and getattr(vars(module)[n], "__module__", None) == module.__name__], module
            continue
        for name in exported:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
                if not (obj.__doc__ or "").strip():
                    missing.append(f"{module.__name__}.{name}")
            elif not _data_documented(module, name, attr_docs):
                missing.append(f"{module.__name__}.{name} (no docstring after the assignment)")
    assert not missing, "public names without a docstring: " + ", ".join(missing)


def test_modules_log_below_the_package_logger() -> None:
    """Every module-level logger is ``remotedialer`` or below it, named after
    its module (the trace logger is the one documented exception)."""
    for module in public_modules():
        for attr, value in vars(module).items():
            if isinstance(value, logging.Logger):
                assert value.name.startswith("remotedialer"), (module.__name__, attr, value.name)
                assert value.name in (module.__name__, "remotedialer.trace"), (module.__name__, attr)
    # the trace logger the logging page documents is the one sessions use
    session = importlib.import_module("remotedialer.session")
    assert session.trace_log.name == "remotedialer.trace"


def test_benchmarks_page_shows_measured_tables_and_charts(tmp_path: Path) -> None:
    """The benchmarks page carries the bench command's measured figures and
    both charts (docs/_static/bench*.png, written by ``python -m benchmarks --chart``)."""
    for chart in ("bench.png", "bench-forward.png"):
        assert (DOCS / "_static" / chart).read_bytes().startswith(b"\x89PNG"), chart
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    page = (out / "benchmarks.html").read_text(encoding="utf-8")
    assert "download 1 GiB" in page and "MB/s" in page
    assert "to be measured" not in page
    assert 'src="_images/bench.png"' in page and 'src="_images/bench-forward.png"' in page


def test_changelog_lists_every_deprecated_module_path() -> None:
    text = (ROOT / "CHANGELOG.rst").read_text(encoding="utf-8")
    missing = [old for old, new in MOVED.items() if f"``{old}`` -> ``{new}``" not in text]
    assert missing == []


def test_install_lines_work_before_the_package_is_published() -> None:
    """remotedialer is not on PyPI: no page may tell a reader to ``pip install
    remotedialer`` (or one of its extras by that name); from a checkout, or
    a wheel built from one, is what works."""
    pages = [ROOT / "README.rst", ROOT / "CHANGELOG.rst", *sorted(DOCS.glob("*.rst"))]
    code = [
        path for folder in ("remotedialer", "benchmarks") for path in sorted((ROOT / folder).rglob("*.py"))
    ]
    pattern = re.compile(r"pip install\s+['\"]?remotedialer\b[^\s`]*")
    offences = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in [*pages, *code]
        for match in pattern.finditer(path.read_text(encoding="utf-8"))
    ]
    assert offences == []
