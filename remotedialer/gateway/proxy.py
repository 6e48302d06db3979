"""The proxy front end: HTTP ``CONNECT``, absolute-form HTTP proxying and
SOCKS5 on one port, reaching targets through an agent's tunnel
(``remotedialer server --proxy-listen ADDR``).

The proxy username is the client key of the agent to go through; the
password is a user secret, checked by ``authorize(secret, client_key)``
(:meth:`~remotedialer.server.credentials.CredentialStore.authorize_user`),
which raises an error with ``status`` 401 (bad secret: HTTP 407 with
``Proxy-Authenticate``, SOCKS5 authentication failure) or 403 (this user may
not reach that agent: HTTP 403, SOCKS5 reply 0x02). Without ``authorize``
the proxy is as open as the example server: any password is accepted.

How each refusal is answered (:func:`refusal_for`):

=============================  ===========  ============================
case                           HTTP         SOCKS5 reply
=============================  ===========  ============================
dial policy refused            403          0x02 not allowed by ruleset
agent's connection cap         503          0x02 not allowed by ruleset
no agent with that key         502          0x04 host unreachable
target refused the dial        502          0x05 connection refused
target timed out               504          0x04 host unreachable
target unreachable             502          0x04 host unreachable
anything else                  502          0x01 general failure
=============================  ===========  ============================

The protocol tells no success of a dial, only a failure (an ERROR from the
agent), so a ``CONNECT`` or SOCKS5 request is answered once the connection
shows data or an error, or after ``limits.dial_confirm_wait`` seconds with
nothing heard (then as a success). An absolute-form request is passed on at
once, rewritten to origin-form with ``Connection: close`` (one request per
connection); a failed dial before any answer byte gives 502.

Threads: one selector thread accepts connections, reads the handshakes
(cut after ``limits.header_timeout`` seconds, over ``limits.max_head`` bytes
or bad SOCKS versions) and waits for dials to show their fate; a small pool
(``limits.workers``) checks secrets and dials; an accepted connection is
then handed to a :class:`~remotedialer.piping.Piper`, which copies both ways
with flow control. No connection holds a thread of its own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Deque, List, Optional, Set, Tuple

from ..addresses import join_host_port
from ..errors import NoSessionError, RemoteError, error_text
from ..observer import NULL_OBSERVER, Observer
from ..piping import Piper, Waker, default_piper
from ..server.port_forward import accept_pending
from .proxy_handshake import (
    DEFAULT_MAX_HEAD,
    DEFAULT_MAX_HEADERS,
    CheckCredentials,
    Close,
    ProxyHandshake,
    ProxyKind,
    ProxyRequest,
    Refusal,
    Send,
)

if TYPE_CHECKING:
    from ..connection import TunnelConnection

__all__ = [
    "ProxyFrontEnd",
    "ProxyLimits",
    "ProxyDial",
    "ProxyAuthorize",
    "refusal_for",
    "DEFAULT_HEADER_TIMEOUT",
]

log = logging.getLogger(__name__)

ProxyDial = Callable[[str, str, str, Optional[float]], "TunnelConnection"]
"""``(client_key, proto, address, timeout) -> TunnelConnection``: the server's ``dial``."""

ProxyAuthorize = Callable[[str, str], object]
"""``(secret, client_key)``: returns if the user of ``secret`` may reach that
agent, raises an error whose ``status`` is 401 (bad secret) or 403 (not this agent)."""

#: Seconds a client has to send its whole handshake (request head, or SOCKS5
#: greeting, credentials and request), as Go's ``http.Server.ReadHeaderTimeout``.
DEFAULT_HEADER_TIMEOUT = 10.0

_RECV_SIZE = 16 * 1024


@dataclass(frozen=True)
class ProxyLimits:
    """The proxy front end's limits (see the module doc)."""

    #: Seconds for the whole handshake; slower clients are cut (0: no limit).
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    #: Bytes of a request head / SOCKS5 handshake.
    max_head: int = DEFAULT_MAX_HEAD
    #: Header lines of a request head.
    max_headers: int = DEFAULT_MAX_HEADERS
    #: Seconds a dial may take to reach the agent.
    dial_timeout: float = 15.0
    #: Seconds a CONNECT/SOCKS5 request waits to hear of a failed dial
    #: before it is answered as a success (0: answer at once).
    dial_confirm_wait: float = 0.2
    #: Seconds an absolute-form request waits for the first byte of its answer.
    response_timeout: float = 60.0
    #: Seconds a piped connection may stay without a byte either way (None: no limit).
    idle_timeout: Optional[float] = 3600.0
    #: Threads checking secrets and dialing.
    workers: int = 16


def refusal_for(error: BaseException) -> Refusal:
    """The answer to a failed authorization or dial (see the module doc's table)."""
    status = getattr(error, "status", None)
    if status == 401:
        return Refusal.AUTH_REQUIRED
    if status == 403:
        return Refusal.NOT_ALLOWED
    if isinstance(error, NoSessionError):
        return Refusal.NO_AGENT
    if isinstance(error, PermissionError):
        if getattr(error, "reason", "") == "max-connections":
            return Refusal.TOO_MANY
        return Refusal.NOT_ALLOWED
    if isinstance(error, ConnectionRefusedError):
        return Refusal.REFUSED
    if isinstance(error, (TimeoutError, socket.timeout)):
        return Refusal.TIMED_OUT
    text = error_text(error).lower()
    if isinstance(error, RemoteError):
        if "not allowed" in text:
            return Refusal.NOT_ALLOWED
        if "unreachable" in text or "no route" in text or "name or service not known" in text:
            return Refusal.UNREACHABLE
    return Refusal.FAILURE


class _Client:
    """One accepted connection, owned by the loop thread until piped."""

    __slots__ = ("sock", "peer", "handshake", "outbox", "deadline", "close_after_send",
                 "conn", "request", "reading", "events", "confirm_by", "upstream")

    def __init__(
        self, sock: socket.socket, peer: str, handshake: ProxyHandshake, deadline: Optional[float]
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.handshake = handshake
        self.outbox = bytearray()
        self.deadline: Optional[float] = deadline  # the handshake must be done by then
        self.close_after_send = False
        self.conn: Optional[TunnelConnection] = None
        self.request: Optional[ProxyRequest] = None
        self.reading = True
        self.events = 0
        self.confirm_by: Optional[float] = None  # answer a dial by then at the latest
        # An absolute-form request's body, read while its answer is awaited
        # and not yet taken by the tunnel (the peer paused us).
        self.upstream = bytearray()


class ProxyFrontEnd:
    """Listens on ``listen`` and serves proxy clients (see the module doc).

    The constructor binds (raising ``OSError``) and starts the loop thread;
    :meth:`stop` ends it and closes every connection. ``authorize`` of ``None``
    accepts any secret (an open proxy, logged at start). Every refusal is
    counted by ``observer.proxy_refused(status)``.
    """

    def __init__(
        self,
        dial: ProxyDial,
        listen: Tuple[str, int] = ("127.0.0.1", 0),
        *,
        authorize: Optional[ProxyAuthorize] = None,
        limits: ProxyLimits = ProxyLimits(),
        piper: Optional[Piper] = None,
        backlog: int = 1024,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self._dial = dial
        self._authorize = authorize
        self._observer = observer
        self.limits = limits
        self.piper = piper or default_piper()
        self._listener = socket.create_server(listen, family=_family(listen[0]), backlog=backlog)
        self._listener.setblocking(False)
        self.address: Tuple[str, int] = self._listener.getsockname()[:2]
        self.name = f"proxy {join_host_port(*self.address)}"
        self._selector = selectors.DefaultSelector()
        self._waker = Waker()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._waker.reader, selectors.EVENT_READ, None)
        # _lock guards _posted, _stopping and _piped; never held while calling out.
        self._lock = threading.Lock()
        self._posted: Deque[Callable[[], None]] = collections.deque()
        self._stopping = False
        self._piped: Set[TunnelConnection] = set()
        self._piped_idle = threading.Condition(self._lock)
        # Loop-thread state: clients in handshake or waiting on a dial, and timers.
        self._clients: Set[_Client] = set()
        self._timers: List[Tuple[float, int, _Client]] = []
        self._sequence = itertools.count()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=limits.workers, thread_name_prefix="remotedialer-proxy-dial")
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name=f"remotedialer-{self.name}", daemon=True)
        self._thread.start()
        if authorize is None:
            log.warning("%s: no user credentials configured: any password is accepted "
                        "and anyone who reaches this port may reach any agent", self.name)
        log.info("%s: listening (HTTP CONNECT, absolute-form HTTP, SOCKS5)", self.name)

    def __enter__(self) -> "ProxyFrontEnd":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def handshaking(self) -> int:
        """Connections not yet piping (in their handshake or waiting on a dial)."""
        return len(self._clients)

    @property
    def active(self) -> int:
        """Connections piping through a tunnel."""
        with self._lock:
            return len(self._piped)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and close every connection, piping or not."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)  # it may hand one more connection to the piper
        with self._lock:
            piped = list(self._piped)
        for conn in piped:
            conn.close()  # the piper sees it and closes the socket
        with self._piped_idle:
            self._piped_idle.wait_for(lambda: not self._piped, timeout)
        self._pool.shutdown(wait=False)

    # --------------------------------------------------------- any thread
    def _post(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the loop thread soon."""
        with self._lock:
            self._posted.append(action)
        self._wake()

    def _wake(self) -> None:
        self._waker.wake()

    # ---------------------------------------------------------- loop thread
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                for key, mask in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept_ready()
                    elif key.fileobj is self._waker.reader:
                        self._waker.drain()
                    else:
                        self._client_ready(key.data, mask)
                self._run_posted()
                self._run_timers()
        except Exception:  # pragma: no cover - a bug here must be loud
            log.exception("%s: loop failed", self.name)
        finally:
            self._shutdown()

    def _run_posted(self) -> None:
        while True:
            with self._lock:
                if not self._posted:
                    return
                action = self._posted.popleft()
            try:
                action()
            except Exception:  # one connection's failure must not end the loop
                log.exception("%s: handling a connection failed", self.name)

    def _accept_ready(self) -> None:
        for sock, peer in accept_pending(self._listener, self.name, time.sleep):
            self.accepted += 1
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass
            limits = self.limits
            deadline = time.monotonic() + limits.header_timeout if limits.header_timeout else None
            client = _Client(sock, join_host_port(str(peer[0]), peer[1]),
                             ProxyHandshake(limits.max_head, limits.max_headers), deadline)
            self._clients.add(client)
            if deadline is not None:
                self._add_timer(client, deadline)
            self._update_interest(client)

    def _add_timer(self, client: _Client, when: float) -> None:
        heapq.heappush(self._timers, (when, next(self._sequence), client))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, client = heapq.heappop(self._timers)
            if client not in self._clients:
                continue
            if client.deadline is not None and client.deadline <= now:
                log.info("%s: %s sent no complete handshake within %gs; closing",
                         self.name, client.peer, self.limits.header_timeout)
                self._observer.proxy_refused(Refusal.SLOW.status)
                client.outbox += client.handshake.timed_out()
                self._close_after_send(client)
            elif client.confirm_by is not None and client.confirm_by <= now:
                self._dial_settled(client, timed_out=True)

    def _update_interest(self, client: _Client) -> None:
        events = 0
        if client.reading and not client.close_after_send:
            events |= selectors.EVENT_READ
        if client.outbox:
            events |= selectors.EVENT_WRITE
        if events == client.events:
            return
        if not events:
            self._selector.unregister(client.sock)
        elif not client.events:
            self._selector.register(client.sock, events, client)
        else:
            self._selector.modify(client.sock, events, client)
        client.events = events

    def _client_ready(self, client: _Client, mask: int) -> None:
        if client not in self._clients:
            return
        if mask & selectors.EVENT_WRITE and not self._flush(client):
            return
        if mask & selectors.EVENT_READ and client.reading:
            try:
                data = client.sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(client)
                return
            if client.conn is not None:  # an absolute-form request's body
                self._body_read(client, data)
                return
            if not data:
                self._drop(client)
                return
            for event in client.handshake.receive_data(data):
                self._handle_event(client, event)
        if client in self._clients:
            self._update_interest(client)

    def _handle_event(self, client: _Client, event: object) -> None:
        if isinstance(event, Send):
            client.outbox += event.data
        elif isinstance(event, Close):
            self._observer.proxy_refused(event.refusal.status)
            log.info("%s: %s: %s; closing", self.name, client.peer, event.reason)
            client.outbox += event.data
            self._close_after_send(client)
        elif isinstance(event, CheckCredentials):
            client.reading = False
            self._pool.submit(self._check_credentials, client, event)
        elif isinstance(event, ProxyRequest):
            client.reading = False
            client.deadline = None  # the client did its part
            client.request = event
            self._pool.submit(self._open, client, event)

    def _flush(self, client: _Client) -> bool:
        """Send what the outbox holds; False if the client is gone."""
        while client.outbox:
            try:
                sent = client.sock.send(client.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client)
                return False
            del client.outbox[:sent]
        if not client.outbox and client.close_after_send:
            self._drop(client)
            return False
        if not client.outbox and client.handshake.done and client.conn is not None:
            self._hand_to_piper(client)
            return False
        self._update_interest(client)
        return True

    def _close_after_send(self, client: _Client) -> None:
        client.close_after_send = True
        client.reading = False
        self._flush(client)

    def _drop(self, client: _Client) -> None:
        """Forget ``client`` and close its socket (and its dial, if any)."""
        self._clients.discard(client)
        if client.events:
            self._selector.unregister(client.sock)
            client.events = 0
        client.sock.close()
        if client.conn is not None:
            client.conn.set_listener(None)
            client.conn.close()
            client.conn = None

    # ------------------------------------------------------ credentials, dials
    def _check(self, client: _Client, username: Optional[str], password: Optional[str]) -> Optional[Refusal]:
        """Worker: whether the user may reach the agent ``username``; None if so."""
        if self._authorize is None:
            return None if username else Refusal.AUTH_REQUIRED
        if username is None or password is None:
            return Refusal.AUTH_REQUIRED
        try:
            self._authorize(password, username)
        except Exception as exc:
            refusal = refusal_for(exc)
            if refusal not in (Refusal.AUTH_REQUIRED, Refusal.NOT_ALLOWED):
                log.exception("%s: checking the secret for %r failed", self.name, username)
                refusal = Refusal.FAILURE
            log.info("%s: %s refused for client key %r from %s: %s", self.name,
                     refusal.status, username, client.peer, error_text(exc))
            return refusal
        return None

    def _check_credentials(self, client: _Client, event: CheckCredentials) -> None:
        """Worker: a SOCKS5 client's credentials; a user who may not reach
        this agent passes here and is refused its request (reply 0x02)."""
        refusal = self._check(client, event.username, event.password)
        self._post(lambda: self._credentials_checked(client, refusal))

    def _credentials_checked(self, client: _Client, refusal: Optional[Refusal]) -> None:
        if client not in self._clients:
            return
        accepted = refusal is not Refusal.AUTH_REQUIRED and refusal is not Refusal.FAILURE
        client.outbox += client.handshake.credentials_checked(accepted)
        if not accepted:
            self._observer.proxy_refused((refusal or Refusal.FAILURE).status)
            self._close_after_send(client)
            return
        client.reading = True
        self._update_interest(client)
        rest = client.handshake.receive_data(b"")
        for event in rest:
            self._handle_event(client, event)
        if client in self._clients:
            self._flush(client)

    def _open(self, client: _Client, request: ProxyRequest) -> None:
        """Worker: check the user, dial the agent and send what the client
        already sent; the loop then waits for the dial's fate."""
        denied = self._check(client, request.username, request.password)
        if denied is not None:
            self._post(lambda: self._refuse(client, denied, denied.text))
            return
        client_key = request.username or ""
        try:
            conn = self._dial(client_key, "tcp", request.address, self.limits.dial_timeout)
        except Exception as exc:
            failed = refusal_for(exc)
            if not isinstance(exc, OSError):
                log.exception("%s: dial through %r failed", self.name, client_key)
            elif not isinstance(exc, PermissionError):  # the policy logged its own line
                log.info("%s: %s: dial %s through %r failed: %s", self.name, client.peer,
                         request.address, client_key, error_text(exc))
            reason = f"{client_key}: {error_text(exc)}"
            self._post(lambda: self._refuse(client, failed, reason))
            return
        first = request.head + client.handshake.take_rest()
        try:
            if first:
                conn.settimeout(self.limits.dial_timeout)
                conn.sendall(first)
            conn.settimeout(None)
        except OSError as exc:
            conn.close()
            lost, why = refusal_for(exc), error_text(exc)
            self._post(lambda: self._refuse(client, lost, why))
            return
        self._post(lambda: self._dialed(client, conn))

    def _body_read(self, client: _Client, data: bytes) -> None:
        """Bytes after an absolute-form request head, read while its answer is
        awaited: pass them on (the piper takes over once the answer starts)."""
        if not data:
            client.reading = False  # the piper meets the EOF again
        client.upstream += data
        self._push_upstream(client)
        self._update_interest(client)

    def _push_upstream(self, client: _Client) -> None:
        conn = client.conn
        assert conn is not None
        try:
            while client.upstream:
                sent = conn.try_send(client.upstream)
                if not sent:
                    break
                del client.upstream[:sent]
        except OSError:
            client.upstream.clear()  # the dial failed: _dial_settled answers
        if client.upstream:
            client.reading = False  # until the peer resumes us

    def _refuse(self, client: _Client, refusal: Refusal, reason: str) -> None:
        self._observer.proxy_refused(refusal.status)
        if client not in self._clients:
            return
        client.outbox += client.handshake.refuse(refusal, reason)
        self._close_after_send(client)

    def _dialed(self, client: _Client, conn: TunnelConnection) -> None:
        if client not in self._clients:
            conn.close()
            return
        client.conn = conn
        request = client.request
        wait = self.limits.dial_confirm_wait
        if request is not None and request.kind is ProxyKind.FORWARD:
            wait = self.limits.response_timeout
        client.confirm_by = time.monotonic() + wait
        self._add_timer(client, client.confirm_by)
        conn.set_listener(lambda _conn: self._post(lambda: self._dial_settled(client, False)))
        if request is not None and request.kind is ProxyKind.FORWARD:
            client.reading = True  # the body follows the head
            self._update_interest(client)
        self._dial_settled(client, timed_out=False)

    def _dial_settled(self, client: _Client, timed_out: bool) -> None:
        """The dial's connection changed (or its wait ran out): answer the
        client when its fate is known."""
        conn = client.conn
        if client not in self._clients or conn is None or client.confirm_by is None:
            return
        forward = client.request is not None and client.request.kind is ProxyKind.FORWARD
        if forward and client.upstream:
            self._push_upstream(client)
            client.reading = not client.upstream
            self._update_interest(client)
        failed = conn.ended and conn.error is not None and not conn.buffered
        if failed:
            error = conn.error
            assert error is not None
            log.info("%s: %s: dial %s failed: %s", self.name, client.peer, conn.address, error_text(error))
            conn.set_listener(None)
            client.conn = None
            conn.close()
            self._refuse(client, refusal_for(error), error_text(error))
            return
        if timed_out and forward:
            self._refuse(client, Refusal.TIMED_OUT, f"no answer from {conn.address}")
            return
        if not (conn.readable_now() or timed_out) or client.upstream:
            return
        client.confirm_by = None
        client.reading = False
        conn.set_listener(None)
        client.outbox += client.handshake.accept()
        self._flush(client)

    def _hand_to_piper(self, client: _Client) -> None:
        conn = client.conn
        assert conn is not None
        self._clients.discard(client)
        if client.events:
            self._selector.unregister(client.sock)
            client.events = 0
        with self._lock:
            self._piped.add(conn)

        def done() -> None:
            with self._lock:
                self._piped.discard(conn)
                self._piped_idle.notify_all()

        try:
            self.piper.pipe_socket(client.sock, conn, on_done=done, idle_timeout=self.limits.idle_timeout)
        except RuntimeError as exc:  # the piper was stopped
            log.warning("%s: cannot pipe %s: %s", self.name, client.peer, exc)
            conn.close()
            client.sock.close()
            done()

    def _shutdown(self) -> None:
        for client in list(self._clients):
            self._drop(client)
        self._selector.close()
        self._listener.close()
        self._waker.close()
        log.info("%s: stopped", self.name)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET

