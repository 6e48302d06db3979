"""The example server's HTTP/1.1 front end: werkzeug's threaded server with
keep-alive, a bounded number of request threads, and strict request framing.

:class:`BoundedThreadedWSGIServer` runs at most ``max_threads`` request
threads (a WebSocket tunnel holds one for as long as it lives) with a large
listen backlog; :class:`KeepAliveRequestHandler` keeps HTTP/1.1 connections
open between requests, parses request heads itself (the rules are
:mod:`remotedialer.gateway.http1`'s) and frames responses;
:class:`ChunkedRequestBody` reads a chunked request body strictly.

With ``listener_handshakes``, for an app with a ``handshake`` method (the
example server's :class:`~remotedialer.app.ServerApp`) on plain sockets,
the listener's own thread reads each connection's first request head
(:mod:`remotedialer.gateway.head_reader`) and answers a tunnel's upgrade
there: a tunnel gets one thread, its session's reader, and no request
thread; other requests get theirs once their head is in.
"""

from __future__ import annotations

import email.utils
import heapq
import http.client
import io
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from http import HTTPStatus
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, cast

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wsgi import LimitedStream

from ..errors import ListenError
from ..server.process import DEFAULT_MAX_THREADS, LISTEN_BACKLOG
from ..server.wsgi import WSGIApp, header_tokens
from ..server.wsgi import Handshake
from ..transports.wsgi import NODELAY_SET, TAKEN_SOCKET
from .head_reader import HeadReader, environ_from_head, parse_upgrade
from .errors import BadChunkedBody
from .http1 import (
    MAX_CHUNK_LINE,
    ChunkedDecoder,
    ChunkedError,
    RequestRefused,
    read_request_fields,
    request_line_error,
)
from .upstream import poll_readable

__all__ = [
    "BoundedThreadedWSGIServer",
    "KeepAliveRequestHandler",
    "ChunkedRequestBody",
    "BadChunkedBody",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "HeadDeadlines",
    "TLS_HANDSHAKE_TIMEOUT",
    "server_tls_context",
]

log = logging.getLogger(__name__)

#: Seconds an idle keep-alive connection of the built-in server is kept open
#: waiting for its next request (``--keepalive``; 0 closes after each request).
DEFAULT_KEEPALIVE_TIMEOUT = 30.0


#: Seconds a request head may take to arrive, from its first byte (from the
#: accept for a connection's first request), as Go's ``ReadHeaderTimeout``
#: (``--header-timeout``; 0: no limit). Slower connections are closed.
DEFAULT_HEADER_TIMEOUT = 10.0


class HeadDeadlines:
    """One thread that cuts connections whose request head did not arrive in
    time (Go's ``ReadHeaderTimeout``): :meth:`arm` before reading a head,
    :meth:`disarm` once it is read; a connection still armed at its deadline
    is shut down both ways, so the thread blocked reading it sees the end
    and lets it go. Costs no thread per connection."""

    def __init__(self, timeout: float, name: str = "remotedialer-head-deadlines") -> None:
        self.timeout = timeout
        self._name = name
        # _cond guards _armed, _heap, _watcher, _stopped; nothing blocking runs under it
        # except socket.shutdown (which does not block).
        self._cond = threading.Condition(threading.Lock())
        self._armed: Dict[int, socket.socket] = {}
        self._heap: List[Tuple[float, int]] = []
        self._tickets = itertools.count(1)
        # the thread that cuts overdue connections (not named _thread: mypyc's C
        # name for that attribute, __thread, is a GCC keyword)
        self._watcher: Optional[threading.Thread] = None
        self._stopped = False
        self.cut = 0  # connections cut so far

    def arm(self, sock: socket.socket) -> int:
        """Start the clock for ``sock``'s head; returns the ticket for :meth:`disarm`."""
        ticket = next(self._tickets)
        deadline = time.monotonic() + self.timeout
        with self._cond:
            if self._stopped:
                return ticket
            self._armed[ticket] = sock
            heapq.heappush(self._heap, (deadline, ticket))
            if len(self._heap) > 2 * len(self._armed) + 1024:  # mostly disarmed: compact
                self._heap = [entry for entry in self._heap if entry[1] in self._armed]
                heapq.heapify(self._heap)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._watcher.start()
            elif self._heap[0][1] == ticket:
                self._cond.notify()
        return ticket

    def disarm(self, ticket: int) -> bool:
        """The head arrived (or the connection ended): stop the clock. After
        this returns, ``sock`` is never cut by this ticket. False if it was
        cut already."""
        with self._cond:
            return self._armed.pop(ticket, None) is not None

    def stop(self) -> None:
        """End the thread; nothing armed is cut any more."""
        with self._cond:
            self._stopped = True
            self._armed.clear()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, ticket = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                sock = self._armed.pop(ticket, None)
                if sock is None:
                    continue
                self.cut += 1
                try:
                    # socket.socket's own shutdown, also for a TLS socket
                    # (whose override would drop its TLS state under the reader).
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
                log.debug("closed a connection whose request head did not arrive within %gs",
                          self.timeout)
            self._watcher = None


#: Request bodies left unread by the app are read and dropped up to this many
#: bytes to keep the connection; a longer rest closes it.
_MAX_DRAIN = 256 * 1024
_LARGE_CHUNK = 64 * 1024



#: ``socket.MSG_DONTWAIT`` where the platform has it (0: not available).
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class _ProbingReader(io.RawIOBase):
    """The raw reader under a plain-socket connection's ``rfile``: the
    socket's own reader, except that while ``probing`` a read of a blocking
    socket (no timeout) never blocks (``recv_into`` with ``MSG_DONTWAIT``;
    ``None`` when nothing is there),
    so the keep-alive wait can look for a next request without switching
    the socket to non-blocking and back."""

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._prefix = prefix  # read from the socket already (by the listener's head reader)
        self.probing = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> Optional[int]:
        if self._prefix:
            size = min(len(buffer), len(self._prefix))
            buffer[:size] = self._prefix[:size]
            self._prefix = self._prefix[size:]
            return size
        if not self.probing:
            return self._raw.readinto(buffer)
        try:
            return self._sock.recv_into(buffer, 0, _MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


_date_cache: Tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``Date`` header value of a response sent now (formatted once a second)."""
    global _date_cache
    now = int(time.time())
    cached = _date_cache
    if cached[0] != now:
        cached = _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return cached[1]


class KeepAliveRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler with HTTP/1.1 keep-alive.

    werkzeug's own handler answers every request with ``Connection: close``;
    this one keeps a connection open for the next request when that is safe:
    an HTTP/1.1 request that did not ask to close, whose body (if any) was
    read or can be drained, answered with a framed response (``Content-Length``
    honoured exactly, or chunked) that the app finished without error. A
    WebSocket takeover or an app that fails or aborts mid-body closes the
    connection (an aborted chunked body is never terminated, so the client
    sees the truncation). Between requests the thread waits at most the
    server's ``keepalive_timeout`` (and not past the server's shutdown).
    Sets ``TCP_NODELAY``; the access log is at DEBUG level (this module's
    logger).

    Kept instead of werkzeug's own handler after measuring both
    (docs/benchmarks.rst, "Libraries against the hand-written code"): with a
    new connection per request, werkzeug's server cost 2.7-3.4x the server
    CPU per 1 KiB GET and 46-70 % of the request rate.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    rbufsize = 512
    # The current request head's clock (see handle_one_request).
    _head_deadlines: Optional["HeadDeadlines"] = None
    _head_ticket = 0
    _head_cut = False
    #: The request's header lines (fast path), and the message built from them on first use.
    _fields: Optional[List[Tuple[str, str]]] = None
    #: rfile's raw reader on a plain socket (None on TLS: no MSG_DONTWAIT there).
    _probe: Optional["_ProbingReader"] = None
    _message: Optional[http.client.HTTPMessage] = None

    def handle(self) -> None:
        self._requests_served = 0
        super().handle()

    def handle_one_request(self) -> None:
        """Wait for the next request (after the first), then serve it. Its
        head must arrive within the server's ``head_deadlines`` (if any)."""
        if self._requests_served and not self._wait_for_request():
            self.close_connection = True
            return
        self._requests_served += 1
        deadlines: Optional[HeadDeadlines] = getattr(self.server, "head_deadlines", None)
        self._head_deadlines = deadlines
        self._head_cut = False
        self._head_ticket = deadlines.arm(self.connection) if deadlines is not None else 0
        try:
            self._serve_one()
        finally:
            self._head_read()

    def _serve_one(self) -> None:
        """``http.server``'s one request, calling :meth:`run_wsgi` directly
        (werkzeug reaches it through ``__getattr__`` for any ``do_<method>``,
        two failed attribute lookups per request)."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self.run_wsgi()
            self.wfile.flush()
        except socket.timeout as exc:  # a read or a write timed out: drop the connection
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True

    def _head_read(self) -> None:
        """The request head was read (or failed): stop its clock, noting
        whether it ran out (the connection was cut)."""
        if self._head_ticket and self._head_deadlines is not None:
            self._head_cut = not self._head_deadlines.disarm(self._head_ticket)
            self._head_ticket = 0

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """``http.server``'s error answer, except to a connection cut for a
        late head (it is gone: the partial head it left is not its fault to
        hear about, nor worth a log line)."""
        self._head_read()
        if self._head_cut:
            self.close_connection = True
            return
        super().send_error(code, message, explain)

    def setup(self) -> None:
        super().setup()
        if _MSG_DONTWAIT and not isinstance(self.connection, ssl.SSLSocket):
            # rfile over a raw reader that can look without blocking (see
            # _wait_for_request), first serving what the listener read of the head
            take_prefix = getattr(self.server, "take_prefix", None)
            prefix = take_prefix(self.connection) if take_prefix is not None else b""
            self._probe = _ProbingReader(self.connection, prefix)
            self.rfile.close()
            self.rfile = io.BufferedReader(self._probe, max(self.rbufsize, 1))

    def _wait_for_request(self) -> bool:
        """Block until the next request starts arriving (True), or until the
        keep-alive timeout passes or the server stops (False)."""
        sock = self.connection
        probe = self._probe
        if probe is not None and sock.gettimeout() is None:  # (with a timeout, recv polls first)
            # Pipelined bytes may sit in rfile's buffer: peek, reading the
            # socket with MSG_DONTWAIT if the buffer is empty (one system
            # call; switching the socket to non-blocking and back costs two more).
            probe.probing = True
            try:
                if cast(io.BufferedReader, self.rfile).peek(1):
                    return True
            except OSError:
                return False
            finally:
                probe.probing = False
        else:
            try:
                sock.setblocking(False)
                try:
                    rfile: Any = self.rfile
                    if rfile.peek(1):  # already buffered (pipelined)
                        return True
                except ssl.SSLWantReadError:
                    pass
                finally:
                    sock.setblocking(True)
            except OSError:
                return False
        deadline = time.monotonic() + float(getattr(self.server, "keepalive_timeout", 0.0))
        stopping = getattr(self.server, "stopping", None)
        give_up_slot = getattr(self.server, "give_up_idle_slot", None)
        while True:
            if stopping is not None and stopping.is_set():
                return False
            if give_up_slot is not None and give_up_slot():
                return False  # a new connection waits for this thread
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if poll_readable(sock, min(remaining, 0.5)):
                return True  # data, or EOF which the request reader sees

    def parse_request(self) -> bool:
        """Parse the request line and headers (``http.server``'s contract:
        False means an error answer was sent).

        An ``HTTP/1.1`` or ``HTTP/1.0`` request line takes a fast path: the
        header lines are split here instead of by the ``email`` package (the
        front end's largest cost per request); a malformed header line or an
        obsolete folded one is answered with 400, more than 100 lines or one
        over 64 KiB with 431. Against request smuggling, lines must end in
        CRLF, values hold no CR or NUL, and the body's framing must be
        unambiguous (:func:`~remotedialer.gateway.http1.request_framing_error`);
        another ``HTTP/x.y`` version is answered with 505. A request line
        without a version (HTTP/0.9) goes to ``http.server``."""
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if len(words) != 3:
            return bool(super().parse_request())
        self.request_version = "HTTP/1.0"  # for the error answers below
        refused = request_line_error(self.raw_requestline, words[2])
        if refused is not None:
            self.close_connection = True
            self.send_error(*refused)
            return False
        self.requestline = requestline
        self.command, path, self.request_version = words
        if path.startswith("//"):  # as http.server (gh-87389)
            path = "/" + path.lstrip("/")
        self.path = path
        self.close_connection = self.request_version == "HTTP/1.0"
        try:
            fields = read_request_fields(self.request_version, self.rfile.readline)
        except RequestRefused as refusal:
            self.send_error(refusal.status, refusal.reason, refusal.explain)
            return False
        self._head_read()
        self._fields = fields
        self._message = None
        connection = expect = ""
        for name, value in fields:
            lowered = name.lower()
            if lowered == "connection":
                connection = f"{connection},{value}" if connection else value
            elif lowered == "expect":
                expect = value
        tokens = header_tokens(connection) if connection else []
        if "close" in tokens:
            self.close_connection = True
        elif "keep-alive" in tokens:
            self.close_connection = False
        if expect.lower() == "100-continue" and self.request_version == "HTTP/1.1":
            return bool(self.handle_expect_100())
        return True

    @property  # type: ignore[override]
    def headers(self) -> http.client.HTTPMessage:
        """The request's headers as ``http.server`` keeps them, built on
        first use from the fast path's header list (the WSGI environ is
        built from that list directly, see :meth:`make_environ`)."""
        message = self._message
        if message is None:
            message = self.MessageClass()
            for name, value in self._fields or ():
                message[name] = value
            self._message = message
        return message

    @headers.setter
    def headers(self, message: http.client.HTTPMessage) -> None:  # http.server's slow path sets it
        self._message = message
        self._fields = None

    def make_environ(self) -> Dict[str, Any]:
        """The WSGI environ werkzeug's handler would build, made straight from
        the fast path's header list for an origin-form target on a plain
        socket (werkzeug's ``make_environ`` otherwise: other targets, TLS
        for the client certificate, HTTP/0.9)."""
        fields = self._fields
        path = self.path
        if (fields is None or not path.startswith("/") or "#" in path
                or isinstance(self.connection, ssl.SSLSocket)):
            built: Dict[str, Any] = dict(super().make_environ())
            built[NODELAY_SET] = self.disable_nagle_algorithm
            return built
        return environ_from_head(self.command, path, self.request_version, fields, self.connection,
                                 self.client_address, self.server, self.server_version, "werkzeug.socket",
                                 nodelay=self.disable_nagle_algorithm, rfile=self.rfile)

    def date_time_string(self, timestamp: Optional[float] = None) -> str:
        """The ``Date`` header value; the current one is formatted once a second."""
        if timestamp is not None:
            return str(super().date_time_string(timestamp))
        return http_date()

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug('%s "%s" %s %s', self.address_string(), self.requestline, code, size)

    def run_wsgi(self) -> None:
        """Serve one request with ``self.server.app``."""
        self.environ = environ = self.make_environ()
        if environ.get("HTTP_EXPECT", "").lower().strip() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        keep_alive = (
            not self.close_connection
            and self.request_version == "HTTP/1.1"
            and float(getattr(self.server, "keepalive_timeout", 0.0)) > 0
        )
        body: Optional[LimitedStream] = None
        if "wsgi.input_terminated" in environ:
            keep_alive = False  # chunked request body: its end is not tracked here
            environ["wsgi.input"] = ChunkedRequestBody(self.rfile)  # type: ignore[arg-type]
        else:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = -1
            if length < 0:
                keep_alive = False
            elif length > 0:
                body = LimitedStream(self.rfile, length)  # type: ignore[arg-type]
                environ["wsgi.input"] = body
        response = _ResponseWriter(self, environ, keep_alive)
        try:
            app_iter = self.server.app(environ, response.start_response)
            try:
                for data in app_iter:
                    response.write(data)
                response.finish()
            finally:
                close = getattr(app_iter, "close", None)
                if close is not None:
                    close()
        except (ConnectionError, socket.timeout, ssl.SSLEOFError) as exc:
            # The client went away, the app aborted the response, or the
            # socket was taken over (WebSocket): write nothing more.
            self.close_connection = True
            self.connection_dropped(exc, environ)
            return
        except Exception:
            self.close_connection = True
            if self.server.passthrough_errors:
                raise
            log.exception("error on request %s", self.requestline)
            if not response.head_sent:
                response.send_error_response()
            return
        if not response.keep_alive or not _drained(body):
            self.close_connection = True


def _drained(body: Optional[LimitedStream]) -> bool:
    """Read and drop what the app left of a request body; False if too much
    is left or the client went away."""
    if body is None or body.is_exhausted:
        return True
    left = _MAX_DRAIN
    try:
        while not body.is_exhausted and left > 0:
            data = body.read(min(left, _LARGE_CHUNK))
            if not data:
                return False
            left -= len(data)
    except Exception:  # ClientDisconnected, OSError
        return False
    return body.is_exhausted


class _ResponseWriter:
    """``start_response``/``write`` of one request on a
    :class:`KeepAliveRequestHandler`: frames the body and decides whether the
    connection can be kept."""

    def __init__(self, handler: KeepAliveRequestHandler, environ: Dict[str, Any], keep_alive: bool) -> None:
        self.handler = handler
        self.is_head = environ.get("REQUEST_METHOD") == "HEAD"
        self.keep_alive = keep_alive
        self.status: Optional[str] = None
        self.headers: List[Tuple[str, str]] = []
        self.head_sent = False
        self.has_body = True
        self.chunked = False
        self.length: Optional[int] = None
        self.written = 0

    def start_response(self, status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice")
        self.status = status
        self.headers = list(headers)
        return self.write

    def _head(self) -> bytes:
        """The response head (status line, ``Server``, ``Date``, the app's
        headers and the framing ones); decides chunking and keep-alive."""
        if self.status is None:
            raise AssertionError("write() before start_response")
        code_text, _, reason = self.status.partition(" ")
        code = int(code_text)
        self.has_body = not (self.is_head or 100 <= code < 200 or code in (204, 304))
        handler = self.handler
        handler.log_request(code)
        if handler.request_version == "HTTP/0.9":
            return b""
        lines = [
            f"{handler.protocol_version} {code} {reason}\r\n"
            f"Server: {handler.version_string()}\r\nDate: {handler.date_time_string()}\r\n"
        ]
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    self.keep_alive = False
            elif lowered == "connection":
                if "close" in header_tokens(value):
                    self.keep_alive = False
                continue  # hop-by-hop: decided here
            lines.append(f"{name}: {value}\r\n")
        if self.has_body and self.length is None:
            if handler.request_version == "HTTP/1.1":
                self.chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the body ends where the connection does
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1", "strict")

    def write(self, data: bytes) -> None:
        """Send ``data`` (after the head, if not sent yet: a small first
        piece goes out with it in one write); blocks on the socket."""
        head = b""
        if not self.head_sent:
            head = self._head()
        wfile = self.handler.wfile
        if not data or not self.has_body:
            if head:
                wfile.write(head)
            self.head_sent = True
            return
        if len(data) > _LARGE_CHUNK:
            prefix = head + (b"%x\r\n" % len(data) if self.chunked else b"")
            if prefix:
                wfile.write(prefix)
            wfile.write(data)
            if self.chunked:
                wfile.write(b"\r\n")
        elif self.chunked:
            wfile.write(b"%b%x\r\n%b\r\n" % (head, len(data), data))
        else:
            wfile.write(head + data if head else data)
        self.head_sent = True
        self.written += len(data)

    def finish(self) -> None:
        """The app's iterable ended: complete the response."""
        if not self.head_sent:
            self.write(b"")
        if self.chunked:
            self.handler.wfile.write(b"0\r\n\r\n")
        elif self.has_body and self.length is not None and self.written != self.length:
            self.keep_alive = False  # the body does not match its length: the client must see it end

    def send_error_response(self) -> None:
        """The app failed before sending anything: 500, then close."""
        body = b"Internal Server Error\n"
        handler = self.handler
        handler.send_response(500, "Internal Server Error")
        handler.send_header("Content-Type", "text/plain; charset=utf-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)


#: Seconds a client has to complete the TLS handshake (``tls_context``).
TLS_HANDSHAKE_TIMEOUT = 10.0


def server_tls_context(cert_file: str, key_file: Optional[str], client_ca: Optional[str]) -> ssl.SSLContext:
    """The TLS context of ``remotedialer server --tls-cert/--tls-key``; with
    ``client_ca``, client certificates signed by it are verified when
    presented (mTLS: the certificate's name is the agent's client key, see
    :meth:`~remotedialer.server.credentials.CredentialStore.agent_authorizer`)
    but not required (users and agents with secrets need none). Raises
    ``OSError`` or ``ssl.SSLError`` for unreadable files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class BoundedThreadedWSGIServer(ThreadedWSGIServer):
    """werkzeug's threaded server with at most ``max_threads`` request threads
    and HTTP/1.1 keep-alive (:class:`KeepAliveRequestHandler`, idle
    connections closed after ``keepalive_timeout`` seconds; 0 closes each
    connection after one request).

    A request head must arrive within ``header_timeout`` seconds (None: no
    limit), see :class:`HeadDeadlines`. ``listener_handshakes`` (off by
    default, ``REMOTEDIALER_LISTENER_HANDSHAKES=1`` for ``remotedialer
    server``): first heads are read, and tunnels' upgrades answered, on the
    listener's thread (see :meth:`serve_forever`); measured slower at 10,000
    agents opening at once, faster at 1,000 (docs/benchmarks.rst). A WebSocket tunnel holds its thread
    for as long as it lives, and so does a
    streamed download; when all threads are busy, new connections wait in the
    listen backlog instead of spawning more threads. An idle keep-alive
    connection gives up its thread (within half a second) when a new
    connection waits for one.
    """

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, host: str, port: int, app: WSGIApp, max_threads: int = DEFAULT_MAX_THREADS,
                 keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
                 header_timeout: Optional[float] = DEFAULT_HEADER_TIMEOUT,
                 tls_context: Optional[ssl.SSLContext] = None, listener_handshakes: bool = False,
                 **kwargs: Any) -> None:
        self.tls_context = tls_context
        self.max_threads = max_threads
        self.keepalive_timeout = keepalive_timeout
        self.head_deadlines = HeadDeadlines(header_timeout) if header_timeout else None
        self._slots = threading.BoundedSemaphore(max_threads)
        self._stopping = threading.Event()
        self.stopping = self._stopping
        # Connections waiting for a slot, and idle keep-alive connections
        # closing to free one for them; both guarded by _claims_lock.
        self._claims_lock = threading.Lock()
        self._slots_wanted = 0
        self._slots_freeing = 0
        kwargs.setdefault("handler", KeepAliveRequestHandler)
        super().__init__(host, port, app, **kwargs)
        # First heads read on the listener's thread (serve_forever's own
        # loop) for an app that answers upgrades itself (handshake()); TLS
        # connections shake hands on their own threads instead.
        self._app_handshake: Callable[..., Optional[Handshake]] = getattr(app, "handshake", None) or _none
        self.reads_heads = (listener_handshakes and tls_context is None and bool(_MSG_DONTWAIT)
                            and hasattr(app, "handshake"))
        self._header_timeout = header_timeout
        self._heads: Optional[HeadReader] = None  # while serve_forever's loop runs
        self._loop_done = threading.Event()
        self._loop_done.set()
        # What the head reader read of a connection handed to a request
        # thread, by socket (set on the listener's thread, taken on the request's).
        self._prefixes: Dict[int, bytes] = {}
        #: Tunnels whose upgrade was answered on the listener's thread.
        self.handshakes = 0
        if tls_context is not None:
            # The handshake happens on each connection's own thread (werkzeug
            # would make it on the accepting thread, where one silent client
            # stops every accept); the handler reads ssl_context for "https".
            self.ssl_context = tls_context

    def server_bind(self) -> None:
        """Bind; raise :class:`~remotedialer.errors.ListenError` when the
        address cannot be had (werkzeug would print two lines and exit)."""
        try:
            super().server_bind()
        except OSError as exc:
            raise ListenError.binding(self.server_address, exc) from exc

    def give_up_idle_slot(self) -> bool:
        """For an idle keep-alive connection: whether it should close so that
        a waiting connection gets its thread (True for one idle connection
        per waiting one)."""
        if not self._slots_wanted:
            return False
        with self._claims_lock:
            if self._slots_wanted > self._slots_freeing:
                self._slots_freeing += 1
                return True
        return False

    @property
    def heads_cut(self) -> int:
        """Connections the listener cut because their first head was late."""
        return self._heads_cut + (self._heads.cut if self._heads is not None else 0)

    _heads_cut = 0

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and serve until :meth:`shutdown`. With :attr:`reads_heads`,
        one selector on this thread watches the listener and the accepted
        connections whose first head has not arrived (:class:`~remotedialer.
        gateway.head_reader.HeadReader`): a tunnel's upgrade is answered
        here and only its session's reader gets a thread; other requests
        get their request thread once their head is in."""
        if not self.reads_heads:
            super().serve_forever(poll_interval)
            return
        self._loop_done.clear()
        try:
            with selectors.DefaultSelector() as selector:
                heads = self._heads = HeadReader(selector, self._header_timeout, self._head_arrived)
                try:
                    # Non-blocking: one wake-up accepts every connection waiting
                    # (up to _ACCEPTS_PER_WAKE). Accepted sockets are blocking
                    # all the same (accept4 without SOCK_NONBLOCK, no timeout).
                    self.socket.setblocking(False)
                    selector.register(self, selectors.EVENT_READ, None)
                    while not self._stopping.is_set():
                        wait = heads.expire()
                        timeout = poll_interval if wait is None else min(wait, poll_interval)
                        for key, _events in selector.select(timeout):
                            if key.data is None:
                                for _ in range(_ACCEPTS_PER_WAKE):
                                    if not self._accept_one():
                                        break
                            else:
                                heads.readable(key.data)
                        self.service_actions()
                finally:
                    self._heads = None
                    self._heads_cut += heads.cut
                    heads.close()
        except KeyboardInterrupt:
            pass
        finally:
            self.server_close()
            self._loop_done.set()

    def _accept_one(self) -> bool:
        """Accept, verify and process one waiting connection (socketserver's
        ``_handle_request_noblock``); False when none is waiting."""
        try:
            request, client_address = self.get_request()
        except OSError:  # none waiting (BlockingIOError), or it went away
            return False
        if not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return True
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise
        return True

    def take_prefix(self, sock: socket.socket) -> bytes:
        """For a request thread: what the listener read of ``sock`` already."""
        return self._prefixes.pop(id(sock), b"")

    def _head_arrived(self, sock: socket.socket, address: Any, data: bytes) -> None:
        """Listener thread: ``sock``'s first head is in ``data`` (or it ended
        or grew too long first). A WebSocket upgrade with nothing after its
        head goes to the app's handshake here; anything else (or when every
        thread is busy) to a request thread, with ``data``."""
        end = data.find(b"\r\n\r\n") + 4
        parsed = parse_upgrade(data) if end == len(data) else None
        if parsed is not None and self._slots.acquire(blocking=False):
            if self._handshake(sock, address, parsed):
                return
            self._slots.release()
        if data:
            self._prefixes[id(sock)] = data
        try:
            self._dispatch(sock, address)
        except Exception:
            self._prefixes.pop(id(sock), None)
            self.handle_error(sock, address)
            self.shutdown_request(sock)

    def _handshake(self, sock: socket.socket, address: Any,
                   parsed: Tuple[str, str, List[Tuple[str, str]]]) -> bool:
        """Listener thread, holding a slot: let the app answer the upgrade.
        False if the app leaves it to a WSGI request (the slot is the
        caller's again); otherwise the slot goes with the tunnel's thread,
        or is released here once a refusal is written."""
        path, version, fields = parsed
        software = self._server_version
        environ = environ_from_head("GET", path, version, fields, sock, address, self, software,
                                    TAKEN_SOCKET, nodelay=False)
        answer = _DirectAnswer()
        try:
            result = self._app_handshake(environ, answer.start_response)
        except Exception:
            log.exception("error answering the upgrade of %s", address[0] if address else "?")
            result = Handshake(answer.internal_error(), None)
        if result is None:
            return False
        if result.serve is None:
            self._slots.release()
            answer.send(sock, result.body, software)
            self.shutdown_request(sock)
            return True
        self.handshakes += 1
        try:
            threading.Thread(target=self._run_tunnel, args=(result.serve, sock),
                             name="remotedialer-tunnel", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: the tunnel cannot be served
            log.error("no thread for the tunnel of %s: %s", address[0] if address else "?", exc)
            self._slots.release()
            self.shutdown_request(sock)
        return True

    def _run_tunnel(self, serve: Callable[[], None], sock: socket.socket) -> None:
        """A tunnel's thread: its session's reader, until the tunnel ends."""
        try:
            serve()
        except Exception:
            log.exception("tunnel ended with an error")
        finally:
            self.shutdown_request(sock)
            self._slots.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        heads = self._heads
        if heads is not None:  # serve_forever's own loop: read the head here first
            heads.add(request, client_address)
            return
        self._dispatch(request, client_address)

    def _dispatch(self, request: Any, client_address: Any) -> None:
        """Serve ``request`` on a request thread, waiting for a slot."""
        if not self._slots.acquire(blocking=False):
            with self._claims_lock:
                self._slots_wanted += 1
            try:
                while not self._slots.acquire(timeout=0.5):
                    if self._stopping.is_set():
                        self.shutdown_request(request)
                        return
            finally:
                with self._claims_lock:
                    self._slots_wanted -= 1
                    self._slots_freeing = max(0, min(self._slots_freeing - 1, self._slots_wanted))
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls_context is not None:
                request = self._tls_handshake(request, client_address)
                if request is None:
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _tls_handshake(self, sock: socket.socket, client_address: Any) -> Optional[ssl.SSLSocket]:
        """TLS over an accepted connection, within :data:`TLS_HANDSHAKE_TIMEOUT`;
        ``None`` (connection closed, one log line) if the handshake fails."""
        assert self.tls_context is not None
        try:
            sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
            tls = self.tls_context.wrap_socket(sock, server_side=True)
            tls.settimeout(None)
            return tls
        except (OSError, ValueError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address[0], exc)
            sock.close()
            return None

    def shutdown(self) -> None:
        self._stopping.set()
        if self.reads_heads:
            self._loop_done.wait()
        else:
            super().shutdown()
        if self.head_deadlines is not None:
            self.head_deadlines.stop()


def _none(*args: Any) -> None:
    return None


class _DirectAnswer:
    """``start_response`` of an app's handshake answered on the listener's
    thread, and the refusal written from it (``Connection: close``)."""

    def __init__(self) -> None:
        self.status = "500 Internal Server Error"
        self.headers: List[Tuple[str, str]] = []

    def start_response(self, status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
        self.status = status
        self.headers = list(headers)
        return self._no_write

    @staticmethod
    def _no_write(data: bytes) -> None:
        raise AssertionError("a handshake's answer has no write()")

    def internal_error(self) -> List[bytes]:
        body = b"Internal Server Error\n"
        self.start_response("500 Internal Server Error", [
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    def send(self, sock: socket.socket, body: Any, software: str) -> None:
        """Write the answer and its body (best effort: the connection closes after it)."""
        try:
            data = b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        lines = [f"HTTP/1.1 {self.status}\r\nServer: {software}\r\nDate: {http_date()}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers if name.lower() != "connection")
        lines.append("Connection: close\r\n\r\n")
        try:
            sock.settimeout(_ANSWER_TIMEOUT)
            sock.sendall("".join(lines).encode("latin-1") + data)
        except (OSError, UnicodeError) as exc:
            log.debug("could not answer a refused upgrade: %s", exc)


#: Connections the listener accepts per wake-up at most, before it looks at
#: the heads it waits for again.
_ACCEPTS_PER_WAKE = 64
#: Seconds a refusal written on the listener's thread may take.
_ANSWER_TIMEOUT = 1.0


class ChunkedRequestBody(io.RawIOBase):
    """The decoded body of a chunked request, read strictly from ``rfile``
    (the connection's buffered reader). Reads block on the socket; a
    malformed body raises :class:`BadChunkedBody`."""

    def __init__(self, rfile: BinaryIO) -> None:
        self._rfile = rfile
        self._decoder = ChunkedDecoder(strict=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        decoder = self._decoder
        try:
            while decoder.chunk_left == 0 and not decoder.done:
                decoder.feed_line(self._rfile.readline(MAX_CHUNK_LINE + 1))
            if decoder.done:
                return 0
            wanted = min(len(buffer), decoder.chunk_left)
            data = self._rfile.read(wanted)
            if len(data) != wanted:
                raise BadChunkedBody("chunked body ended early")
            buffer[: len(data)] = data
            decoder.consumed(len(data))
            if decoder.chunk_left == 0:
                decoder.feed_line(self._rfile.read(2))  # the CRLF ending the chunk
        except ChunkedError as exc:
            raise BadChunkedBody(str(exc)) from None
        return len(data)
