"""Prometheus metrics for sessions, connections and peer links.

Install the optional extra (``prometheus_client``: ``pip install '.[metrics]'``
from a checkout), then pass a :class:`PrometheusObserver` as the ``observer``
of a server, client or session::

    observer = PrometheusObserver()          # registers in prometheus_client.REGISTRY
    app = with_metrics_endpoint(server_app, observer.registry)

The counters carry the names and labels of the Go project's
``metrics/session_manager.go``. By default they are exposed under exactly the
Go names (``session_server_total_transmit_bytes``, ...) so that dashboards
written for a Go server keep working; ``prometheus_client`` insists that a
counter's samples end in ``_total``, so these are exposed as *untyped*. With
``go_names=False`` they are proper counters and Prometheus' ``_total`` suffix is
appended (``session_server_total_transmit_bytes_total``). Counters of our own
are always proper counters.

The gauges are what the Go project lacks: live sessions, live connections,
paused connections and buffered bytes. They are read from the live sessions
at scrape time, so they can never drift.

:data:`METRICS` lists every metric; the documentation's metrics page and the
tests are generated from and checked against it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

try:
    import prometheus_client
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "remotedialer.metrics needs the prometheus_client package; "
        "install it (the metrics extra) with: pip install prometheus_client"
    ) from exc

from . import exposition
from ..server.wsgi import WSGIApp
from .exposition import Row, RowsFamily
from ..observer import Observer
from ..protocol import MessageType

if TYPE_CHECKING:
    from ..connection import TunnelConnection
    from ..session import Session

__all__ = [
    "METRICS",
    "MetricSpec",
    "PrometheusObserver",
    "make_wsgi_app",
    "observer_with_registry",
    "with_metrics_endpoint",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its base name, kind (``"counter"`` or ``"gauge"``), label
    names, help text, and whether the Go project has it."""

    name: str
    kind: str
    labels: Tuple[str, ...]
    help: str
    from_go: bool

    def exposed_name(self, go_names: bool = True) -> str:
        """The sample name a scrape shows for this metric."""
        if self.kind == "counter" and not (go_names and self.from_go):
            return self.name + "_total"
        return self.name


def _go_counter(name: str, labels: Tuple[str, ...], help_text: str) -> MetricSpec:
    return MetricSpec("session_server_total_" + name, "counter", labels, help_text, True)


ADD_SESSION = _go_counter(
    "add_websocket_session", ("clientkey", "peer"), "Total count of added websocket sessions"
)
REMOVE_SESSION = _go_counter(
    "remove_websocket_session", ("clientkey", "peer"), "Total count of removed websocket sessions"
)
ADD_CONNECTIONS = _go_counter(
    "add_connections", ("clientkey", "proto", "addr"), "Total count of added connections"
)
REMOVE_CONNECTIONS = _go_counter(
    "remove_connections", ("clientkey", "proto", "addr"), "Total count of removed connections"
)
TRANSMIT_BYTES = _go_counter(
    "transmit_bytes", ("clientkey",), "Total bytes of connection data transmitted (DATA payloads)"
)
TRANSMIT_ERROR_BYTES = _go_counter(
    "transmit_error_bytes", ("clientkey",), "Total bytes of error text transmitted (ERROR payloads)"
)
RECEIVE_BYTES = _go_counter(
    "receive_bytes", ("clientkey",), "Total bytes of connection data received (DATA payloads)"
)
PEER_ATTEMPT = _go_counter(
    "peer_ws_attempt", ("peer",), "Total count of attempts to establish a websocket session to a peer server"
)
PEER_CONNECTED = _go_counter(
    "peer_ws_connected", ("peer",), "Total count of websocket sessions to peer servers that came up"
)
PEER_DISCONNECTED = _go_counter(
    "peer_ws_disconnected", ("peer",), "Total count of websocket sessions to peer servers that went down"
)
SEND_FAILURES = MetricSpec(
    "remotedialer_send_failures", "counter", ("clientkey",),
    "Total count of protocol messages that could not be sent", False,
)
SESSIONS = MetricSpec(
    "remotedialer_sessions", "gauge", ("clientkey", "peer"), "Live websocket sessions", False
)
CONNECTIONS = MetricSpec(
    "remotedialer_connections", "gauge", ("clientkey",), "Open connections on live sessions", False
)
PAUSED_CONNECTIONS = MetricSpec(
    "remotedialer_paused_connections", "gauge", ("clientkey", "paused_by"),
    "Paused connections: paused_by=\"us\" when we asked the peer to pause (our receive buffer is full), "
    "paused_by=\"peer\" when the peer asked us to pause (our writes wait)",
    False,
)
BUFFERED_BYTES = MetricSpec(
    "remotedialer_buffered_bytes", "gauge", ("clientkey",),
    "Bytes received on open connections and not yet read by the application", False,
)
SESSIONS_SUSPENDED = MetricSpec(
    "remotedialer_sessions_suspended", "counter", ("clientkey",),
    "Total count of resumable sessions that lost their websocket and were suspended", False,
)
RESUMES = MetricSpec(
    "remotedialer_resumes", "counter", ("clientkey",),
    "Total count of suspended sessions reattached to a new websocket", False,
)
RESUME_BYTES_RESENT = MetricSpec(
    "remotedialer_resume_bytes_resent", "counter", ("clientkey",),
    "Total DATA bytes sent again after a reattach (what the peer had not received)", False,
)
RESUMES_REFUSED = MetricSpec(
    "remotedialer_resumes_refused", "counter", ("reason",),
    "Total count of reattach attempts that could not resume their session (its connections ended)",
    False,
)
REFUSED_HANDSHAKES = MetricSpec(
    "remotedialer_refused_handshakes", "counter", ("status",),
    "Tunnel requests refused before the upgrade, by HTTP status (401 bad secret, 403 secret for "
    "another client key, 400, 429, 503)", False,
)
REFUSED_DIALS = MetricSpec(
    "remotedialer_refused_dials", "counter", ("clientkey", "reason"),
    "Dials refused by the dial policy, by reason (target, no-policy, max-connections)", False,
)
PROXY_REFUSED = MetricSpec(
    "remotedialer_proxy_refused", "counter", ("status",),
    "Proxy front end requests refused, by HTTP status (SOCKS5 refusals under the same: 407 bad "
    "secret, 403 not allowed, 503 connection cap, 502/504 the dial failed, 400/408/431 bad or slow "
    "clients)", False,
)
CREDENTIALS_RELOADS = MetricSpec(
    "remotedialer_credentials_reloads", "counter", ("result",),
    "Reloads of the credentials file: result=\"ok\" took effect, \"failed\" kept the last good one",
    False,
)
DIALS_IN_FLIGHT = MetricSpec(
    "remotedialer_dials_in_flight", "gauge", ("clientkey",),
    "Dials admitted by the dial policy and not yet registered on a session", False,
)

METRICS: Tuple[MetricSpec, ...] = (
    ADD_SESSION,
    REMOVE_SESSION,
    ADD_CONNECTIONS,
    REMOVE_CONNECTIONS,
    TRANSMIT_BYTES,
    TRANSMIT_ERROR_BYTES,
    RECEIVE_BYTES,
    PEER_ATTEMPT,
    PEER_CONNECTED,
    PEER_DISCONNECTED,
    SEND_FAILURES,
    SESSIONS_SUSPENDED,
    RESUMES,
    RESUME_BYTES_RESENT,
    RESUMES_REFUSED,
    REFUSED_HANDSHAKES,
    REFUSED_DIALS,
    PROXY_REFUSED,
    CREDENTIALS_RELOADS,
    SESSIONS,
    CONNECTIONS,
    PAUSED_CONNECTIONS,
    BUFFERED_BYTES,
    DIALS_IN_FLIGHT,
)
"""Every metric a :class:`PrometheusObserver` exposes, in documentation order."""

_COUNTERS = tuple(spec for spec in METRICS if spec.kind == "counter")
_Labels = Tuple[str, ...]


def _is_peer(session: "Session") -> str:
    """The Go ``peer`` label: "true" for a server's session from a peer server.

    An ``is_peer`` attribute on the session decides if present; otherwise a
    server-side session that listens for ADD_CLIENT / REMOVE_CLIENT is a peer
    link (a server gives a client listener to peer sessions only)."""
    flag = getattr(session, "is_peer", None)
    if flag is None:
        flag = not session.is_client and session.client_listener is not None
    return "true" if flag else "false"


class PrometheusObserver(Observer):
    """An :class:`~remotedialer.observer.Observer` that keeps Prometheus metrics.

    Registers itself as a collector in ``registry`` (the default
    ``prometheus_client.REGISTRY`` when ``None``); registering two observers in
    one registry raises ``ValueError`` (duplicated time series). Hooks take one
    short lock and never block on I/O. ``go_names`` chooses the counter naming
    described in the module docstring.

    The ``peer`` label is "true" for sessions that peer servers opened to
    this one (see ``_is_peer``).
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None, *, go_names: bool = True) -> None:
        self.go_names = go_names
        self.registry: CollectorRegistry = prometheus_client.REGISTRY if registry is None else registry
        # _lock guards _counts and _sessions; nothing else is taken while held.
        self._lock = threading.Lock()
        self._counts: Dict[str, Dict[_Labels, float]] = {spec.name: {} for spec in _COUNTERS}
        # live sessions: session_ended follows every session_started (Session.close);
        # a plain set, since a Session compiled with mypyc takes no weak reference
        self._sessions: Set["Session"] = set()
        #: Read at scrape time for ``remotedialer_dials_in_flight``: dials in
        #: flight by client key (e.g. ``server.dials_in_flight_by_key``).
        self.dials_in_flight: Optional[Callable[[], Dict[str, int]]] = None
        self.registry.register(self)

    def unregister(self) -> None:
        """Remove this observer's metrics from its registry."""
        self.registry.unregister(self)

    # ------------------------------------------------------------ counting
    def _add(self, spec: MetricSpec, labels: _Labels, amount: float = 1.0) -> None:
        with self._lock:
            values = self._counts[spec.name]
            values[labels] = values.get(labels, 0.0) + amount

    def value(self, spec: MetricSpec, **labels: str) -> float:
        """The current value of a counter for the given labels (0 if never
        counted); handy in tests and health checks."""
        key = tuple(labels[name] for name in spec.labels)
        if spec.kind != "counter":
            for family in self._collect_gauges():
                if family.name == spec.name:
                    for sample in family.samples:
                        if tuple(sample.labels[name] for name in spec.labels) == key:
                            return float(sample.value)
            return 0.0
        with self._lock:
            return self._counts[spec.name].get(key, 0.0)

    # ------------------------------------------------------- observer hooks
    def session_started(self, session: "Session") -> None:
        with self._lock:
            self._sessions.add(session)
        self._add(ADD_SESSION, (session.client_key, _is_peer(session)))

    def session_ended(self, session: "Session", reason: str) -> None:
        with self._lock:
            self._sessions.discard(session)
        self._add(REMOVE_SESSION, (session.client_key, _is_peer(session)))

    def connection_added(self, session: "Session", conn: "TunnelConnection") -> None:
        self._add(ADD_CONNECTIONS, (session.client_key, conn.proto, conn.address))

    def connection_removed(self, session: "Session", conn: "TunnelConnection") -> None:
        self._add(REMOVE_CONNECTIONS, (session.client_key, conn.proto, conn.address))

    def message_sent(self, session: "Session", message_type: int, payload_size: int) -> None:
        if message_type == MessageType.DATA:
            self._add(TRANSMIT_BYTES, (session.client_key,), payload_size)
        elif message_type == MessageType.ERROR:
            self._add(TRANSMIT_ERROR_BYTES, (session.client_key,), payload_size)

    def message_send_failed(self, session: "Session", message_type: int, payload_size: int) -> None:
        self._add(SEND_FAILURES, (session.client_key,))

    def message_received(self, session: "Session", message_type: int, payload_size: int) -> None:
        if message_type == MessageType.DATA:
            self._add(RECEIVE_BYTES, (session.client_key,), payload_size)

    def session_suspended(self, session: "Session", reason: str) -> None:
        self._add(SESSIONS_SUSPENDED, (session.client_key,))

    def session_resumed(self, session: "Session", resent_bytes: int) -> None:
        self._add(RESUMES, (session.client_key,))
        self._add(RESUME_BYTES_RESENT, (session.client_key,), resent_bytes)

    def resume_refused(self, reason: str) -> None:
        self._add(RESUMES_REFUSED, (reason,))

    def peer_connecting(self, peer_id: str) -> None:
        self._add(PEER_ATTEMPT, (peer_id,))

    def peer_connected(self, peer_id: str) -> None:
        self._add(PEER_CONNECTED, (peer_id,))

    def peer_disconnected(self, peer_id: str) -> None:
        self._add(PEER_DISCONNECTED, (peer_id,))

    def handshake_refused(self, status: int) -> None:
        self._add(REFUSED_HANDSHAKES, (str(status),))

    def dial_refused(self, client_key: str, reason: str) -> None:
        self._add(REFUSED_DIALS, (client_key, reason))

    def proxy_refused(self, status: int) -> None:
        self._add(PROXY_REFUSED, (str(status),))

    def credentials_reloaded(self, ok: bool) -> None:
        self._add(CREDENTIALS_RELOADS, ("ok" if ok else "failed",))

    # ------------------------------------------------------------ collector
    def describe(self) -> List[Metric]:
        """The metric families without samples (lets the registry check names)."""
        return [self._family(spec) for spec in METRICS]

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family with its current samples (called per scrape)."""
        with self._lock:
            snapshot = {name: dict(values) for name, values in self._counts.items()}
        for spec in _COUNTERS:
            yield self._family(spec, sorted(snapshot[spec.name].items()))
        yield from self._collect_gauges()

    def _family(self, spec: MetricSpec, rows: Iterable[Row] = ()) -> RowsFamily:
        """``spec``'s family: untyped for Go-named counters (see the module
        docstring); its samples are ``rows``, rendered fast by the
        endpoint (:mod:`remotedialer.metrics.exposition`)."""
        if spec.kind == "gauge":
            typ = "gauge"
        elif self.go_names and spec.from_go:
            typ = "unknown"
        else:
            typ = "counter"
        return RowsFamily(spec.name, spec.help, typ, spec.exposed_name(self.go_names), spec.labels, rows)

    def _collect_gauges(self) -> List[Metric]:
        with self._lock:
            sessions = list(self._sessions)
        live: Dict[_Labels, int] = {}
        conns: Dict[_Labels, int] = {}
        paused: Dict[_Labels, int] = {}
        buffered: Dict[_Labels, int] = {}
        for session in sessions:
            key = session.client_key
            live[(key, _is_peer(session))] = live.get((key, _is_peer(session)), 0) + 1
            conns.setdefault((key,), 0)
            buffered.setdefault((key,), 0)
            paused.setdefault((key, "us"), 0)
            paused.setdefault((key, "peer"), 0)
            for conn in session.connections():
                conns[(key,)] += 1
                buffered[(key,)] += conn.buffered
                if conn.we_paused_peer:
                    paused[(key, "us")] += 1
                if conn.peer_paused_us:
                    paused[(key, "peer")] += 1
        source = self.dials_in_flight
        in_flight = {(key,): 0 for (key,) in conns}  # every live key, as the other gauges
        in_flight.update(((key,), count) for key, count in (source() if source is not None else {}).items())
        return [
            self._family(spec, sorted(values.items()))
            for spec, values in ((SESSIONS, live), (CONNECTIONS, conns),
                                 (PAUSED_CONNECTIONS, paused), (BUFFERED_BYTES, buffered),
                                 (DIALS_IN_FLIGHT, in_flight))
        ]


def observer_with_registry(process_metrics: bool = True) -> PrometheusObserver:
    """A :class:`PrometheusObserver` in a registry of its own (its
    ``registry`` attribute), with the standard process and Python platform
    metrics (``process_resident_memory_bytes``, ...) unless
    ``process_metrics`` is false. What ``remotedialer server`` serves."""
    registry = CollectorRegistry()
    if process_metrics:
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
    return PrometheusObserver(registry)


def make_wsgi_app(registry: Optional[CollectorRegistry] = None) -> WSGIApp:
    """A WSGI application serving ``registry`` (default: the global one) on
    any path, as ``prometheus_client.make_wsgi_app`` does (Prometheus text
    or OpenMetrics as the scraper's ``Accept`` asks, gzip when accepted),
    with this module's per-client families written straight to text
    (:mod:`remotedialer.metrics.exposition`): the same bytes, in a fraction
    of the time."""
    return exposition.make_wsgi_app(prometheus_client.REGISTRY if registry is None else registry)


def with_metrics_endpoint(
    app: WSGIApp, registry: Optional[CollectorRegistry] = None, path: str = "/metrics"
) -> WSGIApp:
    """Wrap a WSGI ``app`` so that ``GET path`` serves the metrics of
    ``registry`` and every other request goes to ``app``."""
    metrics_app = make_wsgi_app(registry)

    def dispatch(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") == path:
            return metrics_app(environ, start_response)
        return app(environ, start_response)

    return dispatch
