"""The ``/metrics`` endpoint, fast for metric families with thousands of samples.

prometheus_client renders every sample through generic code (label names
sorted, validated and escaped once per sample): about 10 µs a sample, most of
a CPU second for the 70,000 samples of 10,000 client keys. A
:class:`RowsFamily` keeps its samples as rows of label values, and
:func:`render` writes each row with one format string. The shape of that
string (HELP and TYPE lines, sample name, label names and their order) is cut
from what prometheus_client's own encoder writes for a probe sample, so the
output is the encoder's, byte for byte, in whichever format and name escaping
the scraper negotiated. Every other family goes through the encoder itself.

Internal to :mod:`remotedialer.metrics`, which checks that prometheus_client
is installed.
"""

from __future__ import annotations

import gzip
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs

import prometheus_client
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from ..server.wsgi import WSGIApp

__all__ = ["Encoder", "Row", "RowsFamily", "make_wsgi_app", "render"]

Row = Tuple[Tuple[str, ...], float]
"""One sample of a :class:`RowsFamily`: its label values (in the family's
label-name order) and its value."""

Encoder = Callable[[Collector], bytes]
"""A prometheus_client encoder, as ``choose_encoder`` returns it."""

_number_text: Callable[[float], str] = floatToGoString  # a value as every encoder writes it (untyped there)

# zlib's default level, as Go's promhttp: a quarter of the CPU of the level 9
# prometheus_client uses, for output 3% larger (70,000 series: 19 against 74 ms).
_GZIP_LEVEL = 6

_PROBE_VALUE = 0.0
# Label value i of the probe sample: passes through label-value escaping
# (which touches only backslash, double quote and newline) unchanged.
_MARK = "\x00{}\x00"
_MARKS = re.compile("\x00([0-9]+)\x00")


class RowsFamily(Metric):
    """A metric family whose samples are ``rows``, all named ``sample_name``
    with the labels ``label_names``.

    ``samples`` (prometheus_client's ``Sample`` objects, for anything but
    :func:`render`) are built when first asked for; from then on they, not the
    rows, are the family (``rows`` becomes ``None``), so that changing them
    changes what every encoder writes."""

    def __init__(self, name: str, documentation: str, typ: str, sample_name: str,
                 label_names: Sequence[str], rows: Iterable[Row]) -> None:
        super().__init__(name, documentation, typ)  # sets samples = []: see the setter
        self.sample_name = sample_name
        self.label_names = tuple(label_names)
        self.rows: Optional[List[Row]] = list(rows)
        self._samples: Optional[List[Sample]] = None

    @property
    def samples(self) -> List[Sample]:
        if self._samples is None:
            rows = self.rows or []
            self._samples = [Sample(self.sample_name, dict(zip(self.label_names, labels)), value)
                             for labels, value in rows]
            self.rows = None
        return self._samples

    @samples.setter
    def samples(self, samples: List[Sample]) -> None:
        self._samples = samples
        self.rows = None


class _Families:
    """A collector of the given families: what an encoder renders."""

    def __init__(self, families: List[Metric]) -> None:
        self.families = families

    def collect(self) -> List[Metric]:
        return self.families


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _without(rendered: bytes, trailer: bytes) -> bytes:
    """``rendered`` (an encoder's output, which ends in ``trailer``) without
    its trailer."""
    return rendered[:len(rendered) - len(trailer)]


def _line_format(family: RowsFamily, encoder: Encoder, trailer: bytes) -> Optional[Tuple[bytes, str]]:
    """``(header, line format)`` of ``family`` as ``encoder`` writes it: the
    HELP/TYPE lines, and a ``str.format`` string taking the escaped label
    values then the value's text. ``None`` when the probe's output is not
    the one-line-per-sample shape this expects (then the encoder renders
    the family itself)."""
    empty = Metric(family.name, family.documentation, family.type)
    header = _without(encoder(_Families([empty])), trailer)
    probe = Metric(family.name, family.documentation, family.type)
    probe.add_sample(family.sample_name, {name: _MARK.format(index) for index, name in
                                          enumerate(family.label_names)}, _PROBE_VALUE)
    probed = _without(encoder(_Families([probe])), trailer)
    if not probed.startswith(header):
        return None
    line = probed[len(header):].decode("utf-8")
    value_text = " " + _number_text(_PROBE_VALUE) + "\n"
    if line.startswith("#") or line.count("\n") != 1 or not line.endswith(value_text):
        return None
    pieces = _MARKS.split(line[:-len(value_text)])
    order = [int(index) for index in pieces[1::2]]
    if sorted(order) != list(range(len(family.label_names))):
        return None
    fixed = [piece.replace("{", "{{").replace("}", "}}") for piece in pieces[0::2]]
    fields = [f"{{{index}}}" for index in order] + [f" {{{len(order)}}}\n"]
    return header, "".join(text + field for text, field in zip(fixed, fields))


def _render_rows(family: Metric, encoder: Encoder, trailer: bytes) -> Optional[bytes]:
    """``family`` as ``encoder`` writes it, or ``None`` unless it is a
    :class:`RowsFamily` still made of rows that the fast path can write."""
    if not isinstance(family, RowsFamily) or family.rows is None:
        return None
    shape = _line_format(family, encoder, trailer)
    if shape is None:
        return None
    header, line = shape
    write = line.format
    text = "".join([write(*map(_escape_label_value, labels), _number_text(value))
                    for labels, value in family.rows])
    return header + text.encode("utf-8")


def render(registry: Collector, encoder: Encoder) -> bytes:
    """What ``encoder(registry)`` returns (``encoder`` from prometheus_client's
    ``choose_encoder``), with each :class:`RowsFamily` written from its rows.

    Calls ``registry.collect()`` once; raises what it and the encoder raise."""
    trailer = encoder(_Families([]))  # "# EOF\n" in OpenMetrics, nothing in the text format
    chunks: List[bytes] = []
    plain: List[Metric] = []

    def flush() -> None:
        if plain:
            chunks.append(_without(encoder(_Families(plain)), trailer))
            plain.clear()

    for family in registry.collect():
        fast = _render_rows(family, encoder, trailer)
        if fast is None:
            plain.append(family)
        else:
            flush()
            chunks.append(fast)
    flush()
    chunks.append(trailer)
    return b"".join(chunks)


def make_wsgi_app(registry: Collector) -> WSGIApp:
    """A WSGI application serving ``registry`` on any path, as
    ``prometheus_client.make_wsgi_app`` does (format negotiated from
    ``Accept``, gzip when accepted, ``name[]`` filters, OPTIONS), rendering
    ``GET`` scrapes through :func:`render` (and gzipping at a cheaper level:
    the same bytes once unzipped)."""
    fallback = prometheus_client.make_wsgi_app(registry)

    def metrics_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if (environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico"
                or "name[]" in parse_qs(environ.get("QUERY_STRING", ""))):
            return fallback(environ, start_response)  # type: ignore[no-any-return]
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        output = render(registry, encoder)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            output = gzip.compress(output, compresslevel=_GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return metrics_app
