"""The client side: hold a tunnel to a server and serve the server's dials.

:func:`connect_to_proxy` opens one WebSocket with websocket-client and serves a
session until it ends; :class:`TunnelClient` (and the :func:`client_connect`
shorthand) keeps one up with exponential backoff and jitter, and can be
stopped from another thread.

What only a connection needs loads with the first attempt, not at import
(issue 24: ``import`` of the agent's side, and ``remotedialer client
--help``, stay fast): websocket-client and ``ssl``
(:mod:`~remotedialer.transports.websocket_client`), and resumption
(:mod:`~remotedialer.resume`, :mod:`~remotedialer.resumable`) only when
:attr:`Limits.resume_window <remotedialer.config.Limits.resume_window>`
offers it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional

from .config import DEFAULT_LIMITS, Limits
from .errors import HandshakeError, TunnelClosedError, TunnelTimeoutError, error_text
from .observer import NULL_OBSERVER, Observer
from .piping import ConnectAuthorizer, LocalDialer, Piper, SocketDialer
from .session import ConnectHandler, Session
from .transports.base import server_address
from .transports.proxy import parse_proxy_url, proxy_from_environment

if TYPE_CHECKING:
    import ssl

    import websocket

    from .resumable import ResumableSession
    from .transports.websocket_client import WebSocketClientTransport

__all__ = [
    "Backoff",
    "TunnelClient",
    "connect_to_proxy",
    "client_connect",
]

log = logging.getLogger(__name__)

OnConnect = Callable[[Session], None]
"""Called on a new thread with each new session, once it is serving (not
again when a suspended session is reattached)."""

RESUME_RETRY_INTERVAL = 0.5
"""Seconds between attempts to reattach a suspended session."""
RESUME_HANDSHAKE_TIMEOUT = 2.0
"""Handshake timeout of an attempt to reattach (at most)."""


class _ResumeAnswer:
    """What the ``101`` said about resumption (a plain class: a dataclass
    costs 0.7 ms of import)."""

    __slots__ = ("token", "window", "resumed")

    def __init__(self, token: str = "", window: float = 0.0, resumed: bool = False) -> None:
        self.token = token
        self.window = window
        self.resumed = resumed

    @classmethod
    def of(cls, ws: websocket.WebSocket) -> "_ResumeAnswer":
        """Read from the handshake's response headers (resumption offered only)."""
        from .resume import RESUME_HEADER, RESUME_VERSION, RESUMED_HEADER, TOKEN_HEADER, WINDOW_HEADER

        # typed through a variable: websocket-client 1.9.0 (the newest for
        # Python 3.9) leaves getheaders unannotated
        getheaders: Callable[[], Optional[Dict[str, str]]] = ws.getheaders
        headers = getheaders() or {}
        if headers.get(RESUME_HEADER.lower(), "").strip() != RESUME_VERSION:
            return cls()
        try:
            window = float(headers.get(WINDOW_HEADER.lower(), "0"))
        except ValueError:
            window = 0.0
        token = headers.get(TOKEN_HEADER.lower(), "").strip()
        if not token or not window > 0:
            return cls()
        return cls(token, window, headers.get(RESUMED_HEADER.lower(), "").strip() == "1")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter for reconnecting.

    The n-th consecutive failure waits ``min(maximum, initial * factor**n)``
    seconds, scaled by a random factor in ``[1 - jitter, 1]``. A tunnel that
    was up and ended (the server closed it, e.g. shutting down) is reopened
    after a random delay of at most ``restart_jitter`` seconds (and never
    more than ``initial``): at once, but not all clients of one server in
    the same instant.
    """

    initial: float = 1.0
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    restart_jitter: float = 0.5

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (>= 0)."""
        base = min(self.maximum, self.initial * self.factor ** max(failures, 0))
        return base * (1.0 - self.jitter * random.random())

    def restart_delay(self) -> float:
        """Seconds to wait before reopening a tunnel that was up."""
        return min(self.restart_jitter, self.initial) * random.random()


class TunnelClient:
    """Keeps a tunnel to ``url`` up, serving the server's dials.

    ``connect_authorizer(proto, address)`` decides which dials the server may
    make through us; ``None`` refuses all of them. ``dialer`` replaces how
    targets are dialed locally; ``connect_handler`` replaces the whole
    handling of the server's CONNECTs (peering uses it to relay them). Call
    :meth:`run` (blocks) or :meth:`start`, and :meth:`stop` from any thread.

    ``proxy`` is the proxy on the way to the server: ``None`` (the default)
    reads ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` as a Go agent does, a
    URL (``http://``, ``https://``, ``socks5://``, ``socks5h://``, credentials
    as ``user:password@``) is used for every server, ``""`` connects
    directly (see :mod:`remotedialer.transports.proxy`).

    Settings that cannot work (the URL's scheme, host, port or IPv6 literal,
    the proxy URL or variable) raise
    :class:`~remotedialer.errors.ConfigurationError`, a ``ValueError``, here,
    before any attempt. Once running, every failure of an attempt, expected
    or not, is one log line and a backoff: the loop only ends on :meth:`stop`.
    """

    def __init__(
        self,
        url: str,
        headers: Optional[Mapping[str, str]] = None,
        connect_authorizer: Optional[ConnectAuthorizer] = None,
        on_connect: Optional[OnConnect] = None,
        *,
        dialer: Optional[SocketDialer] = None,
        limits: Limits = DEFAULT_LIMITS,
        backoff: Backoff = Backoff(),
        ssl_context: Optional[ssl.SSLContext] = None,
        websocket_options: Optional[Dict[str, Any]] = None,
        observer: Optional[Observer] = None,
        piper: Optional[Piper] = None,
        connect_handler: Optional[ConnectHandler] = None,
        client_key: str = "",
        proxy: Optional[str] = None,
    ) -> None:
        secure, host, port = server_address(url)
        if proxy is None:
            self.proxy = proxy_from_environment(secure, host, port)
        else:
            self.proxy = parse_proxy_url(proxy, "proxy") if proxy else None
        self.url = url
        self.client_key = client_key
        self.headers = dict(headers or {})
        self.on_connect = on_connect
        self.limits = limits
        self.backoff = backoff
        self.ssl_context = ssl_context
        self.websocket_options = websocket_options
        self.observer = observer
        self._local_dialer = LocalDialer(connect_authorizer, dialer, limits, piper)
        self._connect_handler: ConnectHandler = connect_handler or self._local_dialer
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts a backoff wait short (stop, retry_now)
        self._lock = threading.Lock()  # guards _session
        self._session: Optional[Session] = None
        # A resumable session that lost its WebSocket, and the token that
        # reattaches it (guarded by _lock; only the connect loop changes them).
        self._suspended: Optional[ResumableSession] = None
        self._resume_token = ""
        self._connected = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.last_error: Optional[BaseException] = None

    @property
    def session(self) -> Optional[Session]:
        """The live session, if connected."""
        return self._session

    def wait_connected(self, timeout: Optional[float] = None) -> Session:
        """Block until a session is up; raise
        :class:`~remotedialer.errors.TunnelTimeoutError` (a ``TimeoutError``)
        after ``timeout``."""
        if not self._connected.wait(timeout):
            raise TunnelTimeoutError(f"no tunnel to {self.url} within {timeout}s")
        session = self._session
        if session is None:
            raise TunnelTimeoutError(f"tunnel to {self.url} dropped")
        return session

    def connect_once(self) -> str:
        """Open one WebSocket, serve its session until it ends, return why it
        ended. Raises :class:`HandshakeError` or ``OSError`` if it could not
        connect."""
        from .transports.websocket_client import WebSocketClientTransport, open_websocket

        limits = self.limits
        headers = dict(self.headers)
        suspended = self._suspended
        if suspended is not None and suspended.closed:
            suspended = self._suspended = None
        offered = limits.resume_window > 0
        if offered:
            from .resume import RESUME_HEADER, RESUME_VERSION, TOKEN_HEADER

            headers[RESUME_HEADER] = RESUME_VERSION
            if suspended is not None:
                headers[TOKEN_HEADER] = self._resume_token
                limits = limits.replace(
                    handshake_timeout=min(limits.handshake_timeout, RESUME_HANDSHAKE_TIMEOUT)
                )
        ws = open_websocket(
            self.url, headers, limits, self.ssl_context, self.websocket_options, self.proxy
        )
        transport = WebSocketClientTransport(ws, self.limits.max_message_size, self.url)
        try:
            answer = _ResumeAnswer.of(ws) if offered else _ResumeAnswer()
            reattached = self._reattach(suspended, transport, answer) if suspended is not None else None
            self._resume_token = answer.token
            resumed = reattached is not None
            session = reattached if reattached is not None else self._new_session(transport, answer)
            with self._lock:
                if self._stop.is_set():
                    session.close("client stopped")
                    transport.close()
                    return "stopped"
                self._session = session
        except BaseException:
            # e.g. Ctrl-C before stop() can see the session: close on purpose,
            # so that the server ends its side instead of suspending it
            transport.close()
            raise
        self._connected.set()
        log.info("%s to %s", "resumed the tunnel" if resumed else "connected", self.url)
        if self.on_connect is not None and not resumed:
            threading.Thread(
                target=self._run_on_connect, args=(session,), name="remotedialer-on-connect",
                daemon=True,
            ).start()
        try:
            return session.serve()
        finally:
            self._connected.clear()
            with self._lock:
                self._session = None
                if answer.token:  # a resumable session, new or reattached
                    from .resumable import ResumableSession

                    if isinstance(session, ResumableSession) and not session.closed:
                        self._suspended = session

    def _new_session(self, transport: WebSocketClientTransport, answer: _ResumeAnswer) -> Session:
        options: Dict[str, Any] = dict(
            is_client=True, client_key=self.client_key, connect_handler=self._connect_handler,
            limits=self.limits, observer=self.observer,
        )
        if answer.token:
            from .resumable import ResumableSession

            window = min(self.limits.resume_window, answer.window)
            return ResumableSession(transport, resume_window=window, **options)
        return Session(transport, **options)

    def _reattach(
        self, suspended: ResumableSession, transport: WebSocketClientTransport,
        answer: _ResumeAnswer,
    ) -> Optional[ResumableSession]:
        """Carry ``suspended`` on over ``transport`` if the server found it;
        otherwise end it (its connections fail as they would have without
        resumption) and return ``None``."""
        self._suspended = None
        reason = "" if answer.resumed else ("unknown token" if answer.token else "not offered")
        if not reason:
            try:
                suspended.reattach(transport)
                return suspended
            except (TunnelClosedError, TunnelTimeoutError) as exc:
                reason = f"reattach failed: {exc}"
        log.info("could not resume the tunnel to %s (%s): its connections are lost", self.url, reason)
        (self.observer or NULL_OBSERVER).resume_refused(reason)
        suspended.close(f"resume refused: {reason}")
        return None

    def run(self) -> None:
        """Connect, serve, and reconnect with backoff until :meth:`stop`.

        Run on the main thread, Ctrl-C (``KeyboardInterrupt``) stops it too:
        the tunnel is closed and ``run`` returns instead of raising."""
        try:
            self._reconnect_loop()
        except KeyboardInterrupt:
            log.info("interrupted: closing the tunnel to %s", self.url)
            self.stop(timeout=0)
        finally:
            self._local_dialer.shutdown()

    def describe_failure(self, error: BaseException) -> str:
        """The text of the log line for an attempt that failed with ``error``
        (one line; a subclass may say more about its kind of link)."""
        from websocket import WebSocketException  # loaded by the attempt that failed

        if isinstance(error, (OSError, WebSocketException)):
            return error_text(error)
        return f"{type(error).__name__}: {error_text(error)}"

    def _reconnect_loop(self) -> None:
        from websocket import WebSocketException  # with the first attempt, not at import

        failures = 0
        if self.proxy is not None:
            log.info("connecting to %s through proxy %s", self.url, self.proxy)
        while not self._stop.is_set():
            started = time.monotonic()
            lost = False
            try:
                reason = self.connect_once()
                log.info("tunnel to %s ended: %s", self.url, reason)
                self.last_error = None
                lived = time.monotonic() - started
                failures = 0 if lived > self.backoff.initial else failures + 1
                lost = True
            except (HandshakeError, OSError, WebSocketException) as exc:
                self.last_error = exc
                log.warning("failed to connect to %s: %s", self.url, self.describe_failure(exc))
                failures += 1
            except Exception as exc:  # a bug here or below: never a dead loop in a live process
                self.last_error = exc
                log.error("failed to connect to %s: %s", self.url, self.describe_failure(exc))
                log.debug("the unexpected failure's traceback", exc_info=True)
                failures += 1
            if self._stop.is_set():
                break
            suspended = self._suspended
            if suspended is not None and not suspended.closed:
                # resume at once, then every half second: no backoff within the window
                delay = 0.0 if lost else RESUME_RETRY_INTERVAL
                failures = 0
                self._wake.wait(delay)
                self._wake.clear()
                continue
            delay = self.backoff.delay(failures - 1) if failures else self.backoff.restart_delay()
            if failures:
                log.info("reconnecting to %s in %.1fs", self.url, delay)
            self._wake.wait(delay)
            self._wake.clear()

    def start(self) -> threading.Thread:
        """Run :meth:`run` on a daemon thread and return it."""
        self._thread = threading.Thread(target=self.run, name="remotedialer-client", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: Optional[float] = 5.0) -> None:
        """Stop reconnecting and close the current session."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            session = self._session
            suspended, self._suspended = self._suspended, None
        for ending in (session, suspended):
            if ending is not None:
                ending.close("client stopped")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def retry_now(self) -> None:
        """If waiting to reconnect, reconnect at once (e.g. the server is
        known to be back)."""
        self._wake.set()

    def _run_on_connect(self, session: Session) -> None:
        assert self.on_connect is not None
        try:
            self.on_connect(session)
        except Exception as exc:
            log.exception("on_connect failed; closing the session")
            session.close(f"on_connect failed: {exc}")

    def __enter__(self) -> "TunnelClient":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def connect_to_proxy(
    url: str,
    headers: Optional[Mapping[str, str]] = None,
    connect_authorizer: Optional[ConnectAuthorizer] = None,
    on_connect: Optional[OnConnect] = None,
    **options: Any,
) -> str:
    """Open one tunnel to ``url`` and serve it until it ends; return why it
    ended. A refused handshake raises :class:`HandshakeError` carrying the HTTP
    status and body. ``options`` are those of :class:`TunnelClient`."""
    client = TunnelClient(url, headers, connect_authorizer, on_connect, **options)
    return client.connect_once()


def client_connect(
    url: str,
    headers: Optional[Mapping[str, str]] = None,
    connect_authorizer: Optional[ConnectAuthorizer] = None,
    on_connect: Optional[OnConnect] = None,
    *,
    stop_event: Optional[threading.Event] = None,
    **options: Any,
) -> None:
    """Keep a tunnel to ``url`` up, reconnecting with backoff, until
    ``stop_event`` is set (or forever). ``options`` are those of
    :class:`TunnelClient`."""
    client = TunnelClient(url, headers, connect_authorizer, on_connect, **options)
    if stop_event is not None:
        def watch() -> None:
            stop_event.wait()
            client.stop(timeout=0)

        threading.Thread(target=watch, name="remotedialer-client-stop", daemon=True).start()
    client.run()
