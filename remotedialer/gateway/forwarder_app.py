"""The example server's HTTP forwarder: ``/client/<id>/<scheme>/<host>/<path...>``.

A WSGI application that sends the incoming request through the tunnel of
client ``<id>`` to ``<scheme>://<host>/<path...>`` and streams the response
back: status, end-to-end headers, and the body chunk by chunk as it arrives,
never buffered whole.

The request goes out on an :class:`~remotedialer.gateway.upstream.UpstreamConnection`
over the :class:`~remotedialer.connection.TunnelConnection` (for ``https``
targets the connection is bridged to a local socket pair on the shared
:class:`~remotedialer.piping.Piper` thread so :mod:`ssl` can wrap it), taken
from and given back to a :class:`~remotedialer.gateway.upstream.ConnectionPool`.
All the work runs on the WSGI server's request thread plus that one piper
thread: no thread per request is created here. A bodyless GET, HEAD, OPTIONS
or TRACE that fails on a reused connection before any response arrived (the
target closed it at the same moment) is sent once more on a fresh one.
Pooled connections of a client whose session ended are closed when the
session manager reports it (:meth:`Forwarder.watch`) or, at the latest, when
next looked at.

``?timeout=N`` (seconds, default 15, ``0`` for none) is an *idle* timeout: every
single wait (for the response head, for the next piece of the body, for the
peer to let us send) is bounded by it, so a download that keeps flowing is
never cut off however long it takes. The parameter is removed from the query
string sent on. An unknown client, a failed dial or a failure before the
response head arrived is answered with ``500`` and the error text, as the Go
example does; a failure in the middle of the body aborts the downstream
response (the client sees a truncated body, never a silently shortened one).

Upgrades (WebSocket and others): the request's ``Upgrade`` and ``Connection:
Upgrade`` are sent on. A ``101`` answer to a protocol the request asked for is
passed on, written straight to the client's socket (taken from the WSGI
server, as the tunnel endpoint does: werkzeug's and gunicorn's), and the
exchange becomes a two-way byte pipe (:mod:`remotedialer.gateway.upgrade`) on
the request thread, with the same idle timeout, until either side ends. A
``101`` the request did not ask for, or to another protocol, is answered
with ``502`` and a log line.
"""

from __future__ import annotations

import errno
import functools
import io
import itertools
import logging
import re
import socket
import ssl
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from werkzeug.wsgi import get_input_stream

from ..addresses import join_host_port, split_host_optional_port, split_remote_address
from ..bridge import as_socket
from ..errors import DialRefusedError, error_text
from ..piping import Piper, default_piper
from ..server.wsgi import StartResponse, header_tokens, plain_text_response
from ..transports.wsgi import UnsupportedServerError, finish_taken_over_response, socket_from_environ
from .http1 import HOP_BY_HOP
from .upgrade import IDLE_TIMEOUT, RelayError, relay, shut_down
from .upstream import CHUNK, ConnectionPool, PoolKey, UpstreamConnection, UpstreamResponse

__all__ = ["Forwarder", "DialFunction", "ForwardTarget", "BadRequest", "parse_target", "DEFAULT_TIMEOUT"]

log = logging.getLogger(__name__)

DialFunction = Callable[[str, str, str, Optional[float]], Any]
"""``(client_key, proto, address, timeout) -> socket-like connection``, e.g.
``Server.dial``."""


#: Request headers not sent on: ``Host`` is replaced by the target's, and the
#: WSGI server already answered ``Expect: 100-continue``.
_REQUEST_ONLY = frozenset({"host", "expect"})

#: Response headers every WSGI server adds itself; forwarding them would
#: duplicate them.
_SET_BY_WSGI_SERVER = frozenset({"date", "server"})

#: Methods sent once more after a reused connection failed (bodyless ones only).
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

#: Idle timeout of a forwarded request, in seconds, when ``?timeout=`` gives none.
DEFAULT_TIMEOUT = 15.0
_counter = itertools.count(1)


class ForwardTarget:
    """Where one forwarded request goes (parsed from the request path)."""

    __slots__ = ("client_key", "scheme", "host", "address", "path")

    def __init__(self, client_key: str, scheme: str, host: str, address: str, path: str) -> None:
        self.client_key = client_key
        self.scheme = scheme
        self.host = host  # as given: the Host header sent on
        self.address = address  # host:port to dial
        self.path = path  # raw path, starts with "/"

    def url(self, query: str = "") -> str:
        """The target URL, for logs."""
        return f"{self.scheme}://{self.host}{self.path}" + (f"?{query}" if query else "")


class BadRequest(ValueError):
    """The request path or query cannot be forwarded (answered with 400)."""


_DEFAULT_PORTS = {"http": 80, "https": 443}
_BAD_HOST = re.compile(r"[/?#@ \t\r\n]")


def _unquote(text: str) -> str:
    return urllib.parse.unquote(text) if "%" in text else text


def parse_target(path: str, prefix: str = "/client") -> ForwardTarget:
    """Parse a raw request path ``<prefix>/<id>/<scheme>/<host>[/<path...>]``.

    Raises :class:`BadRequest` when it does not have that shape.
    """
    if not path.startswith(prefix + "/"):
        raise BadRequest(f"path must start with {prefix}/")
    parts = path[len(prefix) + 1 :].split("/", 3)
    if len(parts) < 3 or not parts[0] or not parts[2]:
        raise BadRequest(f"expected {prefix}/<id>/<scheme>/<host>/<path>")
    client_key, scheme, host, address = _parse_route(parts[0], parts[1], parts[2])
    rest = "/" + parts[3] if len(parts) == 4 else "/"
    return ForwardTarget(client_key, scheme, host, address, rest)


@functools.lru_cache(maxsize=1024)
def _parse_route(raw_key: str, raw_scheme: str, raw_host: str) -> Tuple[str, str, str, str]:
    """``(client_key, scheme, host, address)`` of a path's first three
    segments. Cached: a gateway sees the same few routes again and again
    (a refusal raises and is not cached)."""
    scheme = raw_scheme.lower()
    host = _unquote(raw_host)
    default_port = _DEFAULT_PORTS.get(scheme)
    if default_port is None:
        raise BadRequest(f"unsupported scheme {raw_scheme!r} (http or https)")
    if _BAD_HOST.search(host):
        raise BadRequest(f"invalid host {host!r}")
    try:
        hostname, port = split_remote_address(host)
    except ValueError as exc:
        raise BadRequest(f"invalid host {host!r}: {exc}") from None
    address = join_host_port(hostname, default_port if port is None else port)
    return _unquote(raw_key), scheme, host, address


def _split_query(query: str) -> Tuple[Optional[str], str]:
    """Take ``timeout`` out of a raw query string: ``(timeout value, rest)``."""
    timeout: Optional[str] = None
    kept: List[str] = []
    for item in query.split("&") if query else []:
        name = urllib.parse.unquote_plus(item.partition("=")[0])
        if name == "timeout":
            timeout = urllib.parse.unquote_plus(item.partition("=")[2])
        elif item:
            kept.append(item)
    return timeout, "&".join(kept)


def _raw_path(environ: Dict[str, Any]) -> str:
    """The request path as the client sent it (percent-encoding intact)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        if "://" in raw.split("?", 1)[0]:  # absolute-form request target
            raw = urllib.parse.urlsplit(raw).path or "/"
        return str(raw.split("?", 1)[0])
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    # PATH_INFO is decoded and latin-1 per PEP 3333: encode it back.
    return urllib.parse.quote(path.encode("latin-1"), safe="/:@!$&'()*+,;=~-._")


def requested_upgrade(environ: Dict[str, Any]) -> Optional[str]:
    """The ``Upgrade`` header value of a request that asks to switch
    protocols (``Connection: Upgrade`` and a non-empty ``Upgrade``), else None."""
    upgrade = str(environ.get("HTTP_UPGRADE", "")).strip()
    if upgrade and "upgrade" in header_tokens(environ.get("HTTP_CONNECTION", "")):
        return upgrade
    return None


@functools.lru_cache(maxsize=512)
def _header_of(key: str) -> Optional[Tuple[str, str]]:
    """``(name, lowered name)`` of the request header an environ key
    carries, or None for a key that is no header or a header never sent on.
    Cached: the same few dozen keys come with every request."""
    if not key.startswith("HTTP_"):
        return None
    name = key[5:].replace("_", "-").title()
    lowered = name.lower()
    if lowered in _REQUEST_ONLY or lowered in HOP_BY_HOP:
        return None
    return name, lowered


def _request_headers(environ: Dict[str, Any], host: str) -> Dict[str, str]:
    """End-to-end request headers to send on, with ``Host`` set to the
    target; an upgrade request keeps its ``Upgrade`` and ``Connection: Upgrade``."""
    connection = environ.get("HTTP_CONNECTION", "")
    connection_tokens = set(header_tokens(connection)) if connection else ()
    headers: Dict[str, str] = {"Host": host}
    for key, value in environ.items():
        header = _header_of(key)
        if header is not None and header[1] not in connection_tokens:
            headers[header[0]] = value
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["Content-Length"] = environ["CONTENT_LENGTH"]
    upgrade = requested_upgrade(environ)
    if upgrade is not None:
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = upgrade
    return headers


#: Response headers never passed on: hop-by-hop ones and those the WSGI server sets.
_NOT_PASSED_ON = HOP_BY_HOP | _SET_BY_WSGI_SERVER


def _response_headers(headers: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The end-to-end response headers to pass on (hop-by-hop ones, those
    named in ``Connection`` and those the WSGI server sets itself dropped)."""
    kept: List[Tuple[str, str]] = []
    connection: List[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered not in _NOT_PASSED_ON:
            kept.append((name, value))
        elif lowered == "connection":
            connection.append(value)
    if not connection:
        return kept
    tokens = set(header_tokens(",".join(connection)))
    return [(name, value) for name, value in kept if name.lower() not in tokens]


def _pool_key(target: ForwardTarget) -> PoolKey:
    return (target.client_key, target.scheme, target.address, target.host)


class _StreamedBody:
    """The WSGI response iterable: yields the upstream body as it arrives.

    Once the body was read to the end, :meth:`close` gives the connection
    back to ``pool`` (unless the target asked to close it); otherwise the
    connection is closed.
    """

    def __init__(
        self,
        request_id: int,
        url: str,
        response: UpstreamResponse,
        connection: UpstreamConnection,
        started: float,
        pool: Optional[ConnectionPool] = None,
        key: Optional[PoolKey] = None,
    ) -> None:
        self.request_id = request_id
        self.url = url
        self.response = response
        self.connection = connection
        self.started = started
        self.pool = pool
        self.key = key
        self.sent = 0
        self._complete = False
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        # An empty first item makes the WSGI server send the response head
        # now, before the body starts (or stalls): the client sees the status
        # at once, and an abort later is a dropped connection, never a
        # keep-alive connection waiting for a response that will not come.
        # Not needed when the body (or its first piece) is already here: the
        # head then goes out with it, in one write.
        if not self.response.body_ready():
            yield b""
        try:
            while True:
                data = self.response.read1(CHUNK)
                if not data:
                    self._complete = True
                    return
                self.sent += len(data)
                yield data
        except OSError as exc:
            log.warning(
                "[%03d] REQ ABORTED %s after %d bytes: %s", self.request_id, self.url, self.sent,
                _describe(exc),
            )
            # Ending the iteration normally would let the WSGI server finish a
            # chunked response as if complete; raising makes it drop the
            # downstream connection instead. ECONNRESET and no chained cause,
            # so that every server we document drops it quietly: werkzeug's
            # handlers any ConnectionError, gunicorn only ECONNRESET, EPIPE
            # and ENOTCONN (anything else is an ERROR with the tracebacks).
            # The warning above says why.
            raise ConnectionResetError(
                errno.ECONNRESET, f"upstream failed mid-body: {_describe(exc)}"
            ) from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        reuse = (
            self._complete
            and self.pool is not None
            and self.key is not None
            and not self.response.will_close
            and self.connection.sock is not None
            and self.connection.idle_clean
        )
        if reuse:
            assert self.pool is not None and self.key is not None
            self.pool.put(self.key, self.connection)
        else:
            self.connection.close()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "[%03d] REQ DONE %s %d bytes in %.3fs%s", self.request_id, self.url, self.sent,
                time.monotonic() - self.started, " (kept alive)" if reuse else "",
            )


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except OSError:  # pragma: no cover - closing never fails on our sockets
        pass


def _buffered_input(environ: Dict[str, Any], sock: socket.socket) -> bytes:
    """Bytes the WSGI server read from the client past the request head
    (werkzeug's buffered reader; gunicorn keeps them out of reach, but a
    client waits for the 101 before it sends, RFC 6455 §4.1)."""
    stream = environ.get("wsgi.input")
    if not isinstance(stream, io.BufferedReader):
        return b""
    sock.setblocking(False)
    try:
        data = stream.peek(CHUNK)
        return stream.read1(len(data)) if data else b""
    except (OSError, ValueError):
        return b""
    finally:
        sock.setblocking(True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RelayError):
        return f"the {exc.side}: {_describe(exc.error)}"
    if isinstance(exc, socket.timeout):
        return "timeout waiting for the target (idle timeout exceeded)"
    return error_text(exc) or type(exc).__name__


class Forwarder:
    """WSGI application forwarding ``<prefix>/<id>/<scheme>/<host>/<path...>``.

    ``dial(client_key, proto, address, timeout)`` opens the tunneled
    connection (``Server.dial``). ``ssl_context`` is used for ``https``
    targets (default: system trust store, hostname checked). ``pool`` keeps
    idle connections for reuse (default: a new :class:`ConnectionPool`;
    pass ``ConnectionPool(max_idle_per_key=0)`` to open one connection per
    request).
    """

    def __init__(
        self,
        dial: DialFunction,
        *,
        prefix: str = "/client",
        default_timeout: float = DEFAULT_TIMEOUT,
        ssl_context: Optional[ssl.SSLContext] = None,
        piper: Optional[Piper] = None,
        pool: Optional[ConnectionPool] = None,
    ) -> None:
        self.dial = dial
        self.prefix = prefix.rstrip("/")
        self.default_timeout = default_timeout
        self.ssl_context = ssl_context
        self._piper = piper
        self.pool = pool if pool is not None else ConnectionPool()

    def watch(self, server: Any) -> None:
        """Close the pooled connections of a client once it has no session
        left on ``server`` (a :class:`~remotedialer.server.Server`)."""

        def on_change(added: bool, client_key: str, _session: Any) -> None:
            if not added and not server.has_session(client_key):
                self.pool.evict(client_key)

        server.add_session_listener(on_change)

    def close(self) -> None:
        """Close the idle pooled connections."""
        self.pool.clear()

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request_id = next(_counter)
        started = time.monotonic()
        try:
            target = parse_target(_raw_path(environ), self.prefix)
            timeout_text, query = _split_query(environ.get("QUERY_STRING", ""))
            timeout = self._timeout(timeout_text)
        except BadRequest as exc:
            return plain_text_response(start_response, 400, str(exc))
        method = environ.get("REQUEST_METHOD", "GET")
        url = target.url(query)
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            log.debug("[%03d] REQ t=%s %s %s", request_id, timeout_text or self.default_timeout, method, url)
        key = _pool_key(target)
        path, headers, body, chunked = self._prepare(environ, target, query)
        connection = self.pool.get(key)
        reused = connection is not None
        while True:
            try:
                if connection is None:
                    connection = self._open(target, timeout)
                else:
                    assert connection.sock is not None
                    connection.sock.settimeout(timeout)
                connection.request(method, path, headers, body, chunked)
                response = connection.getresponse(method)
                break
            except Exception as error:  # unknown client, dead session, refused, timeout...
                # (not 'exc': mypyc types a name by its first except clause, BadRequest above)
                if connection is not None:
                    connection.close()
                    connection = None
                if (reused and body is None and method in _REPLAYABLE
                        and not isinstance(error, socket.timeout)):
                    # The target may have closed the idle connection just as
                    # we sent: once more on a fresh connection.
                    if debug:
                        log.debug("[%03d] REQ RETRY %s on a new connection: %s", request_id, url,
                                  _describe(error))
                    reused = False
                    continue
                log.warning("[%03d] REQ ERR %s: %s", request_id, url, _describe(error))
                # 403 for the dial policy's refusal; anything else 500, as Go does
                status = 403 if isinstance(error, DialRefusedError) else 500
                return plain_text_response(start_response, status, _describe(error))
        if debug:
            log.debug("[%03d] REQ OK %s %d%s", request_id, url, response.status,
                      " (reused)" if reused else "")
        if response.status == 101:
            return self._switch(environ, start_response, request_id, url, response, connection, timeout)
        start_response(f"{response.status} {response.reason}", _response_headers(response.headers))
        return _StreamedBody(request_id, url, response, connection, started, self.pool, key)

    def _switch(
        self,
        environ: Dict[str, Any],
        start_response: StartResponse,
        request_id: int,
        url: str,
        response: UpstreamResponse,
        connection: UpstreamConnection,
        timeout: Optional[float],
    ) -> Iterable[bytes]:
        """The target answered ``101 Switching Protocols``. To a protocol the
        request asked for: pass the answer on and pipe the bytes both ways
        until either side ends (blocking this thread; ``timeout`` is the idle
        timeout), then end the WSGI call without a response of its own.
        Otherwise (no upgrade asked, another protocol, or a WSGI server that
        does not expose its socket) answer 502."""
        asked = requested_upgrade(environ)
        offered = ",".join(value for name, value in response.headers if name.lower() == "upgrade")
        problem = None
        if asked is None:
            problem = "the target switched protocols unasked"
        elif not offered or not set(header_tokens(offered)) <= set(header_tokens(asked)):
            problem = f"the target switched to {offered or 'no protocol'!r}, not to {asked!r}"
        sock: Optional[socket.socket] = None
        kind = ""
        if problem is None:
            try:
                sock, kind = socket_from_environ(environ)
            except UnsupportedServerError as exc:
                problem = str(exc)
        if problem is not None or sock is None:
            connection.close()
            log.warning("[%03d] REQ ERR %s: 101 Switching Protocols refused: %s", request_id, url, problem)
            return plain_text_response(start_response, 502, f"bad upgrade: {problem}")
        upstream, to_client = connection.detach()
        if not isinstance(upstream, socket.socket):  # a TunnelConnection: bridge it to a real socket
            upstream = as_socket(upstream, self._piper)
        lines = [f"HTTP/1.1 101 {response.reason or 'Switching Protocols'}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in _response_headers(response.headers))
        lines.append(f"Connection: Upgrade\r\nUpgrade: {offered}\r\n\r\n")
        try:
            to_target = _buffered_input(environ, sock)
            sock.settimeout(timeout)
            sock.sendall("".join(lines).encode("latin-1"))
            ended = relay(sock, upstream, to_client=to_client, to_target=to_target, idle_timeout=timeout)
        except (OSError, RelayError) as error:  # (not 'exc': mypyc types a name once)
            log.warning("[%03d] UPGRADE ABORTED %s: %s", request_id, url, _describe(error))
        else:
            if ended == IDLE_TIMEOUT:
                log.warning("[%03d] UPGRADE ABORTED %s: %s", request_id, url,
                            _describe(socket.timeout("idle")))
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("[%03d] UPGRADE DONE %s: %s", request_id, url, ended)
        finally:
            _close_quietly(upstream)
            shut_down(sock)
        finish_taken_over_response(kind)

    def _open(self, target: ForwardTarget, timeout: Optional[float]) -> UpstreamConnection:
        """Dial ``target`` through its client (TLS for ``https``); raises what
        the dial or the handshake raised."""
        sock = self.dial(target.client_key, "tcp", target.address, timeout)
        try:
            sock.settimeout(timeout)
            if target.scheme == "https":
                sock = self._wrap_tls(sock, target, timeout)
        except BaseException:
            try:
                sock.close()
            except OSError:  # pragma: no cover
                pass
            raise
        return UpstreamConnection(sock, target.host)

    def _timeout(self, text: Optional[str]) -> Optional[float]:
        if text is None or text == "":
            value = self.default_timeout
        else:
            try:
                value = float(text)
            except ValueError:
                raise BadRequest(f"invalid timeout {text!r}") from None
            if value != value or value < 0:  # NaN or negative
                raise BadRequest(f"invalid timeout {text!r}")
        return value if value > 0 else None

    def _prepare(
        self, environ: Dict[str, Any], target: ForwardTarget, query: str
    ) -> Tuple[str, Dict[str, str], Any, bool]:
        """``(path, headers, body, chunked)`` of the request to send on; body
        is None when the request has none."""
        headers = _request_headers(environ, target.host)
        body: Any = None
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked:
            stream = get_input_stream(environ)
            body = iter(lambda: stream.read(CHUNK), b"")
            headers.pop("Content-Length", None)
        elif headers.get("Content-Length", "0") not in ("", "0"):
            body = get_input_stream(environ)
        path = target.path + (f"?{query}" if query else "")
        return path, headers, body, chunked

    def _wrap_tls(self, conn: Any, target: ForwardTarget, timeout: Optional[float]) -> ssl.SSLSocket:
        """Bridge ``conn`` to a socket pair on the piper thread and wrap our
        end in TLS (``ssl`` needs a real socket)."""
        ours, theirs = socket.socketpair()
        piper = self._piper or default_piper()
        piper.pipe_socket(theirs, conn)
        context = self.ssl_context or ssl.create_default_context()
        hostname = split_host_optional_port(target.host)[0]
        ours.settimeout(timeout)
        try:
            return context.wrap_socket(ours, server_hostname=hostname)
        except BaseException:
            ours.close()
            raise
