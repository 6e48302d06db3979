"""The /metrics endpoint writes the per-client families itself (fast path):
its bytes must be prometheus_client's, in every format and name escaping a
scraper can negotiate, with label values that need escaping."""

from __future__ import annotations

import gzip
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Tuple, cast

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import make_wsgi_app as prometheus_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from remotedialer import metrics
from remotedialer.heartbeat import Heartbeat
from remotedialer.metrics import METRICS, MetricSpec, PrometheusObserver, make_wsgi_app
from remotedialer.metrics.exposition import RowsFamily, render
from remotedialer.protocol import MessageType
from remotedialer.session import Session
from remotedialer.testing import memory_pair

# Client keys, peer ids and addresses that need escaping in a label value
# (backslash, double quote, newline), or that a format string would mangle.
AWKWARD = ["plain", 'quo"te', "back\\slash", "new\nline", "all\\\"\n\\n", "brace{0}}", "ünïcødé ✓", ""]

ACCEPTS = [
    "",
    "text/plain; version=0.0.4",
    "text/plain; version=1.0.0; escaping=allow-utf-8",
    "text/plain; version=1.0.0; escaping=underscores",
    "text/plain; version=1.0.0; escaping=dots",
    "text/plain; version=1.0.0; escaping=values",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text; version=1.0.0; escaping=dots",
    # a Prometheus 3 scrape
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
    "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
]

Expected = Dict[MetricSpec, Dict[Tuple[str, ...], float]]


class Scenario:
    """An observer that saw sessions, connections, traffic and peer links
    under awkward names, and the samples it must show (written out here,
    independently of the observer)."""

    def __init__(self, go_names: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.observer = PrometheusObserver(self.registry, go_names=go_names)
        self.sessions: List[Session] = []
        self.expected: Expected = {spec: {} for spec in METRICS}
        heartbeat = Heartbeat("test-metrics-exposition")
        for index, key in enumerate(AWKWARD):
            _far, near = memory_pair()
            session = Session(near, is_client=False, client_key=key, observer=self.observer,
                              heartbeat=heartbeat)
            self.sessions.append(session)
            self.observer.session_started(session)
            self._expect(metrics.ADD_SESSION, (key, "false"), 1)
            received = 1234567 * index  # 1.234567e+06 and other exponent forms
            self.observer.message_received(session, MessageType.DATA, received)
            self._expect(metrics.RECEIVE_BYTES, (key,), received)
            self.observer.message_sent(session, MessageType.ERROR, index)
            self._expect(metrics.TRANSMIT_ERROR_BYTES, (key,), index)
            conn = cast(Any, SimpleNamespace(proto="tcp", address=f'127.0.0.1:{index}"{key}'))
            self.observer.connection_added(session, conn)
            self._expect(metrics.ADD_CONNECTIONS, (key, "tcp", f'127.0.0.1:{index}"{key}'), 1)
            self.observer.peer_connecting(key)
            self._expect(metrics.PEER_ATTEMPT, (key,), 1)
        ended = self.sessions.pop()
        self.observer.session_ended(ended, "test")
        self._expect(metrics.REMOVE_SESSION, (ended.client_key, "false"), 1)
        for session in self.sessions:
            key = session.client_key
            self._expect(metrics.SESSIONS, (key, "false"), 1)
            self._expect(metrics.CONNECTIONS, (key,), 0)
            self._expect(metrics.BUFFERED_BYTES, (key,), 0)
            self._expect(metrics.PAUSED_CONNECTIONS, (key, "us"), 0)
            self._expect(metrics.PAUSED_CONNECTIONS, (key, "peer"), 0)
            self._expect(metrics.DIALS_IN_FLIGHT, (key,), 0)
        self.observer.dial_refused(AWKWARD[0], "target")
        self._expect(metrics.REFUSED_DIALS, (AWKWARD[0], "target"), 1)
        self.go_names = go_names

    def _expect(self, spec: MetricSpec, labels: Tuple[str, ...], value: float) -> None:
        self.expected[spec][labels] = self.expected[spec].get(labels, 0.0) + value

    def reference(self) -> "Reference":
        return Reference(self.expected, self.go_names)

    def scrape(self, accept: str, accept_encoding: str = "") -> Tuple[Dict[str, str], bytes]:
        """GET the endpoint: (headers, body)."""
        return get(make_wsgi_app(self.registry), accept, accept_encoding)


class Reference:
    """A collector of ``expected`` built the plain prometheus_client way
    (metric family classes, one sample at a time)."""

    def __init__(self, expected: Expected, go_names: bool) -> None:
        self.expected, self.go_names = expected, go_names

    def collect(self) -> Iterator[Metric]:
        for spec in METRICS:
            family: Metric
            if spec.kind == "gauge":
                family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            elif self.go_names and spec.from_go:
                family = Metric(spec.name, spec.help, "untyped")
            else:
                family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            for labels, value in sorted(self.expected[spec].items()):
                family.add_sample(spec.exposed_name(self.go_names), dict(zip(spec.labels, labels)), value)
            yield family


class Fixed:
    """A collector of the given families."""

    def __init__(self, families: List[Metric]) -> None:
        self.families = families

    def collect(self) -> List[Metric]:
        return self.families


def get(app: Any, accept: str, accept_encoding: str = "", query: str = "") -> Tuple[Dict[str, str], bytes]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": query,
               "HTTP_ACCEPT": accept, "HTTP_ACCEPT_ENCODING": accept_encoding}
    answers: List[Tuple[str, List[Tuple[str, str]]]] = []
    body = b"".join(app(environ, lambda status, headers: answers.append((status, headers))))
    assert [status for status, _ in answers] == ["200 OK"]
    return dict(answers[0][1]), body


def parsed(body: bytes, accept: str) -> List[Any]:
    """The families in ``body``, parsed by prometheus_client's parser for the
    format ``accept`` negotiates."""
    _encoder, content_type = choose_encoder(accept)
    parse = parse_openmetrics if content_type.startswith("application/openmetrics-text") else parse_text
    return list(parse(body.decode("utf-8")))


@pytest.mark.parametrize("go_names", [True, False], ids=["go-names", "counters"])
@pytest.mark.parametrize("accept", ACCEPTS)
def test_endpoint_writes_what_prometheus_client_writes(accept: str, go_names: bool) -> None:
    """The endpoint's body is byte for byte what prometheus_client's encoder
    writes for the same samples in plain metric families, and parses into
    the same families."""
    scenario = Scenario(go_names)
    encoder, content_type = choose_encoder(accept)
    headers, body = scenario.scrape(accept)
    assert headers["Content-Type"] == content_type
    expected = encoder(scenario.reference())
    assert body == expected
    families = parsed(body, accept)
    assert families == parsed(expected, accept)
    clientkeys = {sample.labels.get("clientkey") for family in families for sample in family.samples}
    assert set(AWKWARD) <= clientkeys  # each awkward key came back intact


def test_endpoint_matches_prometheus_clients_own_app() -> None:
    """Same body as prometheus_client.make_wsgi_app over the same registry
    (which builds Sample objects), gzipped when asked, and filtered by
    ``name[]`` as it filters."""
    scenario = Scenario()
    theirs = prometheus_wsgi_app(scenario.registry)
    ours = make_wsgi_app(scenario.registry)
    for accept in ACCEPTS:
        assert get(ours, accept) == get(theirs, accept)
        headers, body = get(ours, accept, "gzip")
        assert headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(body) == get(theirs, accept)[1]
    query = "name[]=remotedialer_sessions&name[]=session_server_total_receive_bytes"
    filtered = get(ours, "", query=query)
    assert filtered == get(theirs, "", query=query)
    assert b"remotedialer_sessions{" in filtered[1] and b"remotedialer_connections" not in filtered[1]


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_per_client_families_take_the_fast_path(accept: str) -> None:
    """render() writes every observer family from its rows: none is handed
    to the encoder (which would build a Sample a row: correct, but slow)."""
    scenario = Scenario()
    families = list(scenario.observer.collect())
    assert families and all(isinstance(family, RowsFamily) for family in families)
    encoder, _ = choose_encoder(accept)
    body = render(Fixed(families), encoder)
    assert all(cast(RowsFamily, family).rows is not None for family in families)
    assert body == encoder(scenario.reference())


def test_samples_once_built_are_the_family() -> None:
    """A RowsFamily's samples are built on demand, and once they have been
    (and changed), they are what every encoder writes."""
    scenario = Scenario()
    family = next(family for family in scenario.observer.collect() if family.name == "remotedialer_sessions")
    assert isinstance(family, RowsFamily)
    assert [(sample.labels["clientkey"], sample.value) for sample in family.samples] == [
        (key, 1) for key in sorted(session.client_key for session in scenario.sessions)
    ]
    assert family.rows is None
    family.add_sample("remotedialer_sessions", {"clientkey": "late", "peer": "true"}, 7)
    encoder, _ = choose_encoder("")
    assert b'remotedialer_sessions{clientkey="late",peer="true"} 7.0\n' in render(Fixed([family]), encoder)
