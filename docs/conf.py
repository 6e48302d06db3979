"""Sphinx configuration for the remotedialer documentation.

Build with warnings as errors::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Besides the usual settings this file defines a few small directives that
generate pages from the code, so that the documentation cannot drift from it:

``remotedialer-api``
    one section per public module of the package (found by walking it), each
    an ``automodule`` of that module's ``__all__``;
``remotedialer-exports``
    the names the top-level package exports, linked to where they live;
``remotedialer-limits``
    a table of every field of :class:`remotedialer.config.Limits` with its
    default and the comment written above it;
``remotedialer-metrics``
    the table of every metric in :data:`remotedialer.metrics.METRICS`;
``remotedialer-layers``
    the parts of the package by layer and what each imports at run time
    (``testkit/layers.py``, which ``tests/test_imports.py`` checks with);
``optional-toctree``
    a toctree that leaves out entries listed in ``OPTIONAL_PAGES`` while
    their files do not exist yet (pages other people are writing);
``optional-image``
    an image, or a short note while the file has not been generated yet;
``optional-include``
    a generated reStructuredText file, or placeholder text while it is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path
from typing import Any, List, Sequence

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.directives.other import TocTree
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import remotedialer  # noqa: E402
from remotedialer.deprecation import MOVED  # noqa: E402

logger = logging.getLogger(__name__)

project = "remotedialer"
author = "the remotedialer authors"
copyright = "the remotedialer authors; Apache-2.0"
release = remotedialer.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]
html_theme = "furo"
html_title = f"remotedialer {release}"
html_static_path = ["_static"]
html_css_files = ["remotedialer.css"]
exclude_patterns = ["_build"]
smartquotes = False  # quotes in metric help texts and labels stay as written
templates_path: List[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
# Many modules use ``from __future__ import annotations`` with names imported
# only for type checking; those annotations are shown as written.
autodoc_type_aliases: dict = {}

#: Pages written by other people; left out of the toctree until they exist.
OPTIONAL_PAGES = {"requests", "forwarding"}

#: Top-level modules left out of the API reference (none so far).
API_EXCLUDE: set = set()


def public_modules() -> List[str]:
    """Every public module of the package, parents before children, sorted."""
    names = []
    for info in pkgutil.walk_packages(remotedialer.__path__, "remotedialer."):
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts) or parts[1] in API_EXCLUDE:
            continue
        if info.name in MOVED:  # an old path: the module is documented where it lives now
            continue
        names.append(info.name)
    return sorted(names)


class ApiDirective(SphinxDirective):
    """Generate one section per public module (see the module docstring)."""

    def run(self) -> List[nodes.Node]:
        lines: List[str] = []
        for name in public_modules():
            title = f"``{name}``"
            lines += [title, "-" * len(title), "", f".. automodule:: {name}", ""]
            module = importlib.import_module(name)
            if getattr(module, "__all__", None):
                lines += ["   :members:", ""]
            else:
                lines += ["   :no-members:", ""]
        return _parse(self, lines, titles=True)


class ExportsDirective(SphinxDirective):
    """List ``remotedialer.__all__`` with links to the defining modules."""

    def run(self) -> List[nodes.Node]:
        lines = []
        for name in remotedialer.__all__:
            obj = getattr(remotedialer, name)
            home = _home_module(name, obj)
            lines.append(f"* :py:obj:`{name} <{home}.{name}>` (from :py:mod:`{home}`)")
        return _parse(self, lines)


def _home_module(name: str, obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return str(module)
    for candidate in public_modules():  # data: the module whose __all__ has it
        if name in getattr(importlib.import_module(candidate), "__all__", ()):
            return candidate
    raise ValueError(f"cannot tell where remotedialer.{name} is defined")


class LimitsDirective(SphinxDirective):
    """Tabulate every field of :class:`Limits` with its default and comment."""

    def run(self) -> List[nodes.Node]:
        from remotedialer.config import Limits

        analyzer = ModuleAnalyzer.for_module("remotedialer.config")
        comments = analyzer.find_attr_docs()
        rows = []
        for field in dataclasses.fields(Limits):
            comment = " ".join(comments.get(("Limits", field.name), [])).strip()
            if not comment:
                logger.warning("Limits.%s has no #: comment", field.name, location=self.get_location())
            is_size = any(word in field.name for word in ("threshold", "buffer", "message"))
            rows.append((f"``{field.name}``", _show_default(field.default, is_size), comment))
        return _parse(self, _list_table(("field", "default", "meaning"), rows, widths="25 15 60"))


def _show_default(value: Any, is_size: bool) -> str:
    """A default as code, sizes also in KiB or MiB."""
    shown = f"``{value!r}``"
    if is_size and isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        unit, amount = ("MiB", value // (1 << 20)) if value % (1 << 20) == 0 else ("KiB", value // 1024)
        shown += f" ({amount} {unit})"
    return shown


class MetricsDirective(SphinxDirective):
    """Tabulate :data:`remotedialer.metrics.METRICS`."""

    option_spec = {"go": directives.unchanged}

    def run(self) -> List[nodes.Node]:
        from remotedialer.metrics import METRICS

        want_go = self.options.get("go", "yes") == "yes"
        rows = []
        for spec in METRICS:
            if spec.from_go != want_go:
                continue
            name = f"``{spec.exposed_name()}``"
            if spec.kind == "counter" and spec.from_go:
                name += f" (``{spec.exposed_name(go_names=False)}`` with ``go_names=False``)"
            labels = ", ".join(f"``{label}``" for label in spec.labels)
            rows.append((name, spec.kind, labels, spec.help))
        return _parse(self, _list_table(("name", "type", "labels", "meaning"), rows, widths="35 10 20 35"))


class LayersDirective(SphinxDirective):
    """Tabulate the package's parts by layer with the parts each imports."""

    def run(self) -> List[nodes.Node]:
        from testkit.layers import LAYERS, MODULES, group_graph, group_of, layer_of

        layers = {group_of(module): layer_of(module) for module in MODULES if module != "remotedialer"}
        graph = group_graph()
        rows = []
        for group in sorted(layers, key=lambda name: (layers[name], name)):
            layer = layers[group]
            name = "core (the top-level modules)" if group == "core" else f"``{group}``"
            uses = sorted(graph.get(group, ()), key=lambda name: (layers[name], name))
            shown = ", ".join("core" if used == "core" else f"``{used}``" for used in uses) or "nothing"
            rows.append((name, f"{layer}: {LAYERS[layer - 1]}", shown))
        return _parse(self, _list_table(("part", "layer", "imports at run time"), rows, widths="30 30 40"))


class OptionalTocTree(TocTree):
    """A toctree without the entries of ``OPTIONAL_PAGES`` that do not exist."""

    def run(self) -> List[nodes.Node]:
        kept = []
        for line in self.content:
            entry = line.strip()
            if entry in OPTIONAL_PAGES:
                self.env.note_dependency(str(DOCS / f"{entry}.rst"))  # re-read when it appears
            if entry in OPTIONAL_PAGES and not (DOCS / f"{entry}.rst").exists():
                logger.info("toctree: %s.rst does not exist yet; left out", entry)
                continue
            kept.append(line)
        self.content = StringList(kept, source=self.content.source(0) if self.content else "")
        return super().run()


class OptionalImage(SphinxDirective):
    """``.. optional-image:: _static/x.png`` with an ``:alt:``; a note while
    the file is missing."""

    required_arguments = 1
    option_spec = {"alt": directives.unchanged, "missing": directives.unchanged}

    def run(self) -> List[nodes.Node]:
        path = self.arguments[0]
        self.env.note_dependency(str(DOCS / path))
        if (DOCS / path).exists():
            return _parse(self, [f".. image:: {path}", f"   :alt: {self.options.get('alt', path)}"])
        note = self.options.get("missing", f"({path} has not been generated yet.)")
        return _parse(self, [note])


class OptionalInclude(SphinxDirective):
    """``.. optional-include:: file.inc``: the file's reStructuredText if it
    exists (e.g. written by the benchmark command), else the directive's own
    content."""

    required_arguments = 1
    has_content = True

    def run(self) -> List[nodes.Node]:
        path = DOCS / self.arguments[0]
        self.env.note_dependency(str(path))  # a missing one: rebuilt until it appears
        if path.exists():
            return _parse(self, path.read_text(encoding="utf-8").splitlines())
        return _parse(self, list(self.content))


def _list_table(header: Sequence[str], rows: Sequence[Sequence[str]], widths: str) -> List[str]:
    lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [header, *rows]:
        for index, cell in enumerate(row):
            lines.append(f"   {'* -' if index == 0 else '  -'} {cell}")
    return lines


def _parse(directive: SphinxDirective, lines: List[str], titles: bool = False) -> List[nodes.Node]:
    source = directive.get_source_info()[0]
    content = StringList(lines, source=source)
    node = nodes.section() if titles else nodes.container()
    if titles:
        nested_parse_with_titles(directive.state, content, node)
    else:
        directive.state.nested_parse(content, directive.content_offset, node)
    return list(node.children)


def setup(app: Sphinx) -> dict:
    app.add_directive("remotedialer-api", ApiDirective)
    app.add_directive("remotedialer-exports", ExportsDirective)
    app.add_directive("remotedialer-limits", LimitsDirective)
    app.add_directive("remotedialer-metrics", MetricsDirective)
    app.add_directive("remotedialer-layers", LayersDirective)
    app.add_directive("optional-toctree", OptionalTocTree)
    app.add_directive("optional-image", OptionalImage)
    app.add_directive("optional-include", OptionalInclude)
    return {"parallel_read_safe": True}
