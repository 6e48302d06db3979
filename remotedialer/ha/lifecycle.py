"""Health endpoints and graceful shutdown of a server instance.

:class:`GracefulShutdown` watches one :class:`~remotedialer.server.Server`:

* :meth:`~GracefulShutdown.healthz` (``/healthz``) answers 200 while the
  process is alive;
* :meth:`~GracefulShutdown.readyz` (``/readyz``) answers 200 while the
  instance accepts tunnels (its peer links are up or being retried), 503 from
  the moment shutdown begins; ``?verbose`` lists the checks. With peer
  discovery, a new instance becomes ready once it has joined the mesh: every
  peer DNS lists is linked with it both ways (so it can route to their
  clients from its first request), or ``join_timeout`` passed (a peer that
  is listed but dead must not keep it out); once joined it stays so;
* :meth:`~GracefulShutdown.guard` wraps the connect endpoint: once shutdown
  begins, new client tunnels are refused with 503 (peers may still link,
  so that a newly started instance learns our clients while we drain);
* :meth:`~GracefulShutdown.shutdown` runs the shutdown: readiness fails,
  new tunnels are refused, existing ones keep working for ``drain_seconds``
  (load balancers take the instance out; requests in flight finish), then
  every client tunnel is closed with a WebSocket close frame (clients
  reconnect at once, to another instance), the peers are sent REMOVE_CLIENT
  for each of them, and the server closes.

:func:`chain_sigterm` starts the shutdown on SIGTERM and hands the signal on
to the previous handler when it is done (under gunicorn: the worker's own,
which then stops the worker); :func:`is_gunicorn_worker` tells whether the
current SIGTERM handler is a gunicorn worker's.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple, cast

from werkzeug.wrappers import Request

from ..server.wsgi import StartResponse, WSGIApp, WSGIEnviron, plain_text_response

if TYPE_CHECKING:
    from ..server.tunnel_server import Server
    from .discovery import DnsPeerDiscovery
    from .peering import Peering
    from ..session import Session

__all__ = [
    "DEFAULT_DRAIN_SECONDS",
    "CLOSE_TIMEOUT",
    "GracefulShutdown",
    "chain_sigterm",
    "is_gunicorn_worker",
]

log = logging.getLogger(__name__)

_NO_STORE = [("Cache-Control", "no-store")]

DEFAULT_DRAIN_SECONDS = 0.0
"""Seconds between failing readiness and closing the tunnels. 0 closes them
at once; on Kubernetes give the endpoints a few seconds to drop the pod."""

CLOSE_TIMEOUT = 5.0
"""Seconds the closing of tunnels and the REMOVE_CLIENT announcements may take."""

JOIN_SETTLE_SECONDS = 1.0
"""How long a new instance waits, once every peer's link to it is up, before
it reports ready: the peers' client lists arrive over those links, without
an end marker (a rolling restart under load routed a request to an instance
20 ms after it joined, before it had read them)."""

SERVING, DRAINING, CLOSING, STOPPED = "serving", "draining", "closing", "stopped"


def _peering(server: "Server") -> "Peering":
    """The server's peering layer, whose links and announcements the
    lifecycle reads: the package's :class:`~remotedialer.ha.peering.Peering`."""
    return cast("Peering", server.peering)


class GracefulShutdown:
    """Health, readiness and graceful shutdown of ``server``; see the module doc.

    ``discovery`` (if any) keeps running while draining and is stopped before
    the tunnels close; ``join_timeout`` defaults to three of its refresh
    intervals; ``join_settle`` is :data:`JOIN_SETTLE_SECONDS`.
    """

    def __init__(
        self,
        server: "Server",
        *,
        drain_seconds: float = DEFAULT_DRAIN_SECONDS,
        close_timeout: float = CLOSE_TIMEOUT,
        discovery: Optional["DnsPeerDiscovery"] = None,
        join_timeout: Optional[float] = None,
        join_settle: float = JOIN_SETTLE_SECONDS,
    ) -> None:
        if drain_seconds < 0:
            raise ValueError("drain_seconds must not be negative")
        self.server = server
        self.drain_seconds = drain_seconds
        self.close_timeout = close_timeout
        self.discovery = discovery
        if join_timeout is None:
            join_timeout = 3 * discovery.refresh_interval if discovery is not None else 0.0
        self.join_timeout = join_timeout
        self.join_settle = join_settle
        self._started = time.monotonic()
        self._joined = discovery is None  # set once, never cleared
        self._join_detail = "joined the peers"
        self._lock = threading.Lock()  # guards _state and _thread
        self._state = SERVING
        self._thread: Optional[threading.Thread] = None
        self._skip_drain = threading.Event()
        self._stopped = threading.Event()
        self._on_stopped: List[Callable[[], None]] = []

    @property
    def state(self) -> str:
        """``serving``, ``draining``, ``closing`` or ``stopped``."""
        return self._state

    # --------------------------------------------------------------- probes
    def checks(self) -> List[Tuple[str, bool, str]]:
        """The readiness checks: ``(name, passed, detail)`` each."""
        state = self._state
        result = [("shutdown", state == SERVING, state)]
        links = _peering(self.server).links()
        up = sum(1 for link in links if link.connected)
        # A link that is down is being retried (links retry until removed).
        result.append(("peer-links", True, f"{up}/{len(links)} up, the rest retrying"))
        if self.discovery is not None:
            error = self.discovery.last_error
            running = self.discovery.running or state != SERVING
            detail = f"{len(self.discovery.peer_ids())} peers"
            if error is not None:
                detail += f", last lookup failed: {error}"
            result.append(("peer-discovery", running, detail))
            result.append(self._join_check(self.discovery))
        return result

    def _join_check(self, discovery: "DnsPeerDiscovery") -> Tuple[str, bool, str]:
        """Whether every discovered peer is linked with us both ways (or the
        join timeout passed); true for good once it was."""
        if self._joined:
            return ("joined", True, self._join_detail)
        if not discovery.last_success:
            waiting = "no peer lookup yet"
        else:
            connected = {link.spec.peer_id for link in _peering(self.server).links() if link.connected}
            incoming = {peer: self.server.peer_sessions.sessions(peer) for peer in discovery.peer_ids()}
            missing = sorted(
                peer for peer, sessions in incoming.items() if peer not in connected or not sessions
            )
            # A peer announces its clients over its link right after it
            # opens, with no end marker: give the newest link a moment.
            newest = max((session.started_at for sessions in incoming.values() for session in sessions),
                         default=0.0)
            if missing:
                waiting = f"waiting for {', '.join(missing[:5])}"
            elif time.monotonic() - newest < self.join_settle:
                waiting = "reading the peers' client lists"
            else:
                waiting = ""
        if waiting and time.monotonic() - self._started < self.join_timeout:
            return ("joined", False, waiting)
        if waiting:
            self._join_detail = f"gave up waiting for peers after {self.join_timeout:g}s ({waiting})"
        self._joined = True
        return ("joined", True, self._join_detail)

    def ready(self) -> bool:
        """Whether every readiness check passes."""
        return all(passed for _name, passed, _detail in self.checks())

    def healthz(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        """WSGI app: 200 ``ok`` (the process answers)."""
        return plain_text_response(start_response, 200, "ok\n", _NO_STORE)

    def readyz(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        """WSGI app: 200 when ready, 503 otherwise; ``?verbose`` lists the checks."""
        checks = self.checks()
        ready = all(passed for _name, passed, _detail in checks)
        if "verbose" in environ.get("QUERY_STRING", ""):
            text = "".join(f"[{'+' if passed else '-'}]{name} {detail}\n" for name, passed, detail in checks)
        else:
            text = ""
        text += "ok\n" if ready else "not ready\n"
        return plain_text_response(start_response, 200 if ready else 503, text, _NO_STORE)

    def session_table(self) -> Dict[str, Any]:
        """What this instance holds: its client keys (with their session
        counts), its peers (and which links are up), and the client keys
        each peer advertised to it."""
        server = self.server
        links = _peering(server).links()
        return {
            "id": server.peer_id,
            "state": self._state,
            "clients": {key: len(server.sessions(key)) for key in server.list_clients()},
            "peers": sorted(link.spec.peer_id for link in links),
            "links_up": sorted(link.spec.peer_id for link in links if link.connected),
            "remote_clients": _peering(server).remote_clients(),
        }

    def sessions(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """WSGI app: :meth:`session_table` as JSON (a debugging aid: it
        lists every client key, so mount it only where that is fine)."""
        body = json.dumps(self.session_table(), sort_keys=True).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    def guard(self, app: WSGIApp) -> WSGIApp:
        """``app`` (the connect endpoint) refusing new client tunnels with
        503 once shutdown began; authenticated peers still get through."""

        def guarded(environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
            if self.refuses(environ):
                return self.server.error_writer(environ, start_response, 503, "server shutting down")
            return app(environ, start_response)

        return guarded

    def refuses(self, environ: WSGIEnviron) -> bool:
        """Whether the connect request in ``environ`` is refused (503): a
        new client tunnel once shutdown began (authenticated peers pass)."""
        return self._state != SERVING and self.server.peering.authenticate(Request(environ).headers) is None

    # ------------------------------------------------------------- shutdown
    def add_stopped_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the shutdown is complete."""
        self._on_stopped.append(callback)

    def begin(self) -> bool:
        """Start the shutdown on a new thread; False if it had started
        already (then the rest of the drain is skipped: a second signal
        means hurry). Does not block."""
        with self._lock:
            if self._thread is not None:
                started = False
            else:
                started = True
                self._thread = threading.Thread(
                    target=self._shutdown, name="remotedialer-shutdown", daemon=True
                )
        if not started:
            self.skip_drain()
            return False
        self._mark(DRAINING)
        self._thread.start()
        return True

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Run the whole shutdown (see the module doc) and wait for it, at
        most ``timeout`` seconds; True once it is complete."""
        self.begin()
        return self.wait(timeout)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the shutdown is complete; False after ``timeout``."""
        return self._stopped.wait(timeout)

    def skip_drain(self) -> None:
        """End the drain now (close the tunnels without waiting further)."""
        self._skip_drain.set()

    def _mark(self, state: str) -> None:
        with self._lock:
            self._state = state

    def _shutdown(self) -> None:
        try:
            started = time.monotonic()
            log.info("shutting down: not ready, refusing new tunnels, draining for %gs", self.drain_seconds)
            self._skip_drain.wait(self.drain_seconds)
            self._mark(CLOSING)
            if self.discovery is not None:
                self.discovery.stop()
            closed = self._close_tunnels()
            flushed = _peering(self.server).flush_announcements(self.close_timeout)
            if not flushed:
                log.warning("some peers were not told of every client that left")
            self.server.close("server shutting down")
            log.info("shut down: %d tunnel(s) closed in %.2fs", closed, time.monotonic() - started)
        except Exception:  # pragma: no cover - whatever happens, finish
            log.exception("graceful shutdown failed")
            self.server.close("server shutting down")
        finally:
            self._mark(STOPPED)
            self._stopped.set()
            for callback in self._on_stopped:
                try:
                    callback()
                except Exception:
                    log.exception("shutdown callback failed")

    def _close_tunnels(self) -> int:
        """Close every client session (each sends its close frame) and wait
        (at most ``close_timeout``) until they left the session table;
        returns how many there were."""
        manager = self.server.session_manager
        emptied = threading.Event()

        def listener(added: bool, _key: str, _session: "Session") -> None:
            if not added and len(manager) == 0:
                emptied.set()

        manager.add_listener(listener)
        try:
            sessions = manager.all_sessions()
            for session in sessions:
                session.close("server shutting down")
            if len(manager):
                emptied.wait(self.close_timeout)
            for session in manager.all_sessions():  # one that slipped past the guard
                session.close("server shutting down")
        finally:
            manager.remove_listener(listener)
        return len(sessions)


def is_gunicorn_worker(handler: Any) -> bool:
    """Whether ``handler`` (a signal handler) is a method of a gunicorn
    worker: one of gunicorn's classes or a subclass of them (such as
    :class:`remotedialer.workers.RemotedialerWorker`)."""
    owner = getattr(handler, "__self__", None)
    return owner is not None and any(
        cls.__module__.startswith("gunicorn.workers") for cls in type(owner).__mro__)


def chain_sigterm(shutdown: GracefulShutdown) -> None:
    """On SIGTERM, run ``shutdown`` and then call the SIGTERM handler that
    was installed before (gunicorn's worker stops then). A second SIGTERM
    skips the rest of the drain. Call from the main thread."""
    previous = signal.getsignal(signal.SIGTERM)

    def hand_on() -> None:
        if callable(previous):
            previous(signal.SIGTERM, None)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    def handler(signum: int, _frame: object) -> None:
        log.info("received SIGTERM: shutting down gracefully")
        shutdown.begin()

    shutdown.add_stopped_callback(hand_on)
    signal.signal(signal.SIGTERM, handler)
