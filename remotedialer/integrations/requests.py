"""``requests`` (and ``urllib3``) over tunneled connections.

Three ways in, all built on a *dial function* ``dial(proto, address, timeout)``
that returns a connected socket-like object, such as ``session.dial`` of a
:class:`~remotedialer.session.Session` or ``server.dialer(client_key)``:

* :class:`TunnelAdapter`: a transport adapter to mount on a
  ``requests.Session`` for the URL prefixes that should go through the tunnel;
* :class:`TunnelPoolManager`: the same for plain ``urllib3``;
* :func:`patch_requests`: an opt-in monkeypatch so that ``requests.get(...)``
  and sessions created while it is active use the tunnel (optionally only for
  some hosts), undone by its handle or at the end of a ``with`` block.

Routing rules:

* Host names are resolved on the far side: the dial address is the URL's
  ``host:port`` as written (``[v6]:port`` for IPv6 literals).
* Proxies are ignored for tunneled requests, whether they come from the
  environment (``HTTP_PROXY`` & co. with ``trust_env``) or from ``proxies=``:
  the tunnel is the route, and no request meant for the tunnel leaves any
  other way.
* Plain ``http`` uses the tunneled connection itself; its ``fileno()`` makes
  urllib3's liveness check notice a pooled connection the far side closed.
* ``https`` runs urllib3's own TLS code (certificate and hostname checks,
  ``verify=`` bundles, client certificates) over :func:`~remotedialer.bridge.as_socket`,
  a real socket bridged to the tunneled connection. A failed handshake closes
  the tunneled connection.

Timeouts: the connect timeout bounds the dial function (and, as in urllib3,
the TLS handshake); errors there become ``requests.ConnectTimeout`` or
``requests.ConnectionError``. The protocol has no connect acknowledgement, so
a far-side dial that hangs shows up as a read timeout and one that fails as a
``requests.ConnectionError`` carrying the far side's error text.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import requests
import requests.adapters
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from ..addresses import join_host_port, split_host_optional_port
from ..bridge import as_socket, lost_transport, tunnel_error
from ..connection import TunnelConnection
from ..piping import Piper

__all__ = [
    "Dial",
    "TunnelAdapter",
    "TunnelPoolManager",
    "TunnelHTTPConnection",
    "TunnelHTTPSConnection",
    "RequestsPatch",
    "patch_requests",
    "dial_address",
]

log = logging.getLogger(__name__)

Dial = Callable[[str, str, Optional[float]], Any]
"""``dial(proto, address, timeout) -> socket-like``: opens a connection through
a tunnel. Raises ``OSError`` (e.g. :class:`~remotedialer.errors.DialError`) or
``TimeoutError`` when it cannot."""


def dial_address(host: str, port: int) -> str:
    """The ``host:port`` dial address for a URL's host (unresolved; brackets
    around IPv6 literals)."""
    return join_host_port(host.strip("[]"), port)


def _timeout_value(timeout: Any) -> Optional[float]:
    """urllib3's connect timeout as seconds (its 'default' sentinel becomes the
    process default, as ``socket.create_connection`` would use)."""
    if timeout is None or isinstance(timeout, (int, float)):
        return None if timeout is None else float(timeout)
    return socket.getdefaulttimeout()


def _dial_through(connection: HTTPConnection, dial: Dial) -> Any:
    """Dial ``connection``'s host and port; map failures to urllib3's errors."""
    timeout = _timeout_value(connection.timeout)
    address = dial_address(connection._dns_host, connection.port)
    try:
        sock = dial("tcp", address, timeout)
    except socket.timeout as exc:  # TimeoutError on Python >= 3.10
        raise ConnectTimeoutError(
            connection,
            f"Connection to {address} through the tunnel timed out. (connect timeout={timeout})",
        ) from exc
    except OSError as exc:
        raise NewConnectionError(
            connection, f"Failed to establish a new connection through the tunnel: {exc}"
        ) from exc
    log.debug("dialed %s through the tunnel: %s", address, sock)
    return sock


class TunnelHTTPConnection(HTTPConnection):
    """A urllib3 HTTP connection whose socket comes from a dial function."""

    def __init__(self, *args: Any, tunnel_dial: Dial, tunnel_piper: Optional[Piper] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tunnel_dial = tunnel_dial

    def _new_conn(self) -> socket.socket:
        """Blocks in the dial function; raises ``ConnectTimeoutError`` or
        ``NewConnectionError``."""
        return _dial_through(self, self.tunnel_dial)  # type: ignore[no-any-return]


class TunnelHTTPSConnection(HTTPSConnection):
    """A urllib3 HTTPS connection over a dial function: the tunneled
    connection is bridged to a real socket so that urllib3's TLS code runs
    unchanged."""

    def __init__(self, *args: Any, tunnel_dial: Dial, tunnel_piper: Optional[Piper] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tunnel_dial = tunnel_dial
        self.tunnel_piper = tunnel_piper
        self._tunneled: Optional[TunnelConnection] = None

    def _new_conn(self) -> socket.socket:
        """Blocks in the dial function; raises ``ConnectTimeoutError`` or
        ``NewConnectionError``."""
        conn = _dial_through(self, self.tunnel_dial)
        if isinstance(conn, socket.socket):
            return conn  # already a real socket: TLS can wrap it directly
        if not isinstance(conn, TunnelConnection):
            conn.close()
            raise NewConnectionError(self, f"cannot run TLS over {type(conn).__name__}")
        self._tunneled = conn
        try:
            return as_socket(conn, self.tunnel_piper)
        except (OSError, RuntimeError) as exc:
            raise NewConnectionError(self, f"cannot bridge the tunneled connection: {exc}") from exc

    def connect(self) -> None:
        """Dial and run the TLS handshake (bounded by the connect timeout).

        A failure closes the tunneled connection. When the tunneled connection
        itself failed (the far side could not dial, the session ended), raises
        ``NewConnectionError`` with its text instead of the TLS error it caused.
        """
        self._tunneled = None
        try:
            super().connect()
        except BaseException as exc:
            sock, self.sock = self.sock, None
            if sock is not None:
                sock.close()  # the piper then closes the tunneled connection
            cause = tunnel_error(self._tunneled)
            if cause is not None and lost_transport(exc):
                raise NewConnectionError(
                    self, f"Failed to establish a new connection through the tunnel: {cause}"
                ) from cause
            raise


class TunnelHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = TunnelHTTPConnection


class TunnelHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = TunnelHTTPSConnection


class TunnelPoolManager(urllib3.PoolManager):
    """A urllib3 ``PoolManager`` whose connections all go through ``dial``.

    Use it like any pool manager: ``TunnelPoolManager(session.dial).request("GET", url)``.
    ``piper`` copies for https connections (default: the process-wide one).
    :meth:`clear` (and so ``requests.Session.close``) closes idle pooled
    connections at once.
    """

    def __init__(self, dial: Dial, num_pools: int = 10, headers: Optional[Mapping[str, str]] = None,
                 *, piper: Optional[Piper] = None, **connection_pool_kw: Any) -> None:
        super().__init__(num_pools, headers, **connection_pool_kw)
        self.dial = dial
        self.piper = piper
        # Close a pool's idle connections as soon as the pool is cleared or
        # evicted, not when it is garbage collected: each holds a far-side
        # connection. Connections in use are closed when they come back.
        self.pools.dispose_func = lambda pool: pool.close()
        self.pool_classes_by_scheme = {
            "http": TunnelHTTPConnectionPool,
            "https": TunnelHTTPSConnectionPool,
        }

    def _new_pool(self, scheme: str, host: str, port: int,
                  request_context: Optional[Dict[str, Any]] = None) -> HTTPConnectionPool:
        # The dial function reaches the connections as pool keyword arguments;
        # it is added after the pool key was computed, so it is not part of it.
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        context["tunnel_dial"] = self.dial
        context["tunnel_piper"] = self.piper
        return super()._new_pool(scheme, host, port, context)

    def proxy_from_url(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - guard
        raise ValueError("a TunnelPoolManager does not use proxies")


class TunnelAdapter(requests.adapters.HTTPAdapter):
    """A ``requests`` transport adapter that sends everything through ``dial``.

    Mount it for the prefixes that should use the tunnel::

        http = requests.Session()
        http.mount("https://", TunnelAdapter(server.dialer("client-1")))

    Pooling and keep-alive work as with the default adapter (one pool per
    host, connections reused). ``proxies`` (explicit or from the environment)
    are ignored for requests it sends. ``piper`` copies for https connections.
    """

    __attrs__ = requests.adapters.HTTPAdapter.__attrs__ + ["dial", "piper"]

    def __init__(
        self,
        dial: Dial,
        pool_connections: int = requests.adapters.DEFAULT_POOLSIZE,
        pool_maxsize: int = requests.adapters.DEFAULT_POOLSIZE,
        max_retries: Union[int, urllib3.Retry] = requests.adapters.DEFAULT_RETRIES,
        pool_block: bool = requests.adapters.DEFAULT_POOLBLOCK,
        *,
        piper: Optional[Piper] = None,
    ) -> None:
        self.dial = dial
        self.piper = piper
        super().__init__(pool_connections, pool_maxsize, max_retries, pool_block)

    def init_poolmanager(self, connections: int, maxsize: int,
                         block: bool = requests.adapters.DEFAULT_POOLBLOCK, **pool_kwargs: Any) -> None:
        self._pool_connections = connections
        self._pool_maxsize = maxsize
        self._pool_block = block
        self.poolmanager = TunnelPoolManager(
            self.dial, num_pools=connections, maxsize=maxsize, block=block, piper=self.piper,
            **pool_kwargs,
        )

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:  # pragma: no cover - guard
        raise requests.exceptions.InvalidProxyURL("a TunnelAdapter does not use proxies")

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Union[bool, str] = True, cert: Any = None,
             proxies: Optional[Mapping[str, str]] = None) -> requests.Response:
        """Send ``request`` through the tunnel; blocks per ``timeout`` and
        raises as ``HTTPAdapter.send`` does. ``proxies`` are ignored."""
        if proxies and any(proxies.values()):
            log.debug("ignoring proxies for tunneled request to %s", request.url)
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert,
                            proxies=None)


# ---------------------------------------------------------------- patching
HostSpec = Tuple[str, Optional[int]]


def _parse_host(entry: str) -> HostSpec:
    """``"name"``, ``"name:port"``, ``"[v6]"``, ``"[v6]:port"`` or a bare IPv6
    literal -> (lower-case host, port or None)."""
    return split_host_optional_port(entry.strip().lower())


class _HostRouter(requests.adapters.BaseAdapter):
    """Sends requests for chosen hosts to ``tunnel``, the rest to ``direct``."""

    def __init__(self, tunnel: TunnelAdapter, direct: requests.adapters.BaseAdapter,
                 hosts: List[HostSpec]) -> None:
        super().__init__()
        # typed as the base class: its close() is typed in every version of
        # types-requests, HTTPAdapter's not in those for Python 3.9
        self.tunnel: requests.adapters.BaseAdapter = tunnel
        self.direct = direct
        self.hosts = hosts

    def routes_through_tunnel(self, url: str) -> bool:
        parsed = urlparse(url)
        host = (parsed.hostname or "").lower()
        port = parsed.port or (443 if parsed.scheme.lower() == "https" else 80)
        return any(host == name and (want is None or want == port) for name, want in self.hosts)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        route = self.tunnel if self.routes_through_tunnel(request.url or "") else self.direct
        return route.send(request, **kwargs)

    def close(self) -> None:
        self.tunnel.close()
        self.direct.close()


class RequestsPatch:
    """The handle :func:`patch_requests` returns: undo it with :meth:`undo`,
    or use it as a context manager."""

    def __init__(self, dial: Dial, hosts: Optional[Iterable[str]], piper: Optional[Piper]) -> None:
        self.dial = dial
        self.hosts = None if hosts is None else [_parse_host(h) for h in hosts]
        self.piper = piper
        self.active = False

    def mount(self, session: requests.Session) -> None:
        """Route ``session``'s requests (for the chosen hosts) through the tunnel."""
        for prefix in ("http://", "https://"):
            adapter: requests.adapters.BaseAdapter = TunnelAdapter(self.dial, piper=self.piper)
            if self.hosts is not None:
                direct = session.adapters.get(prefix) or requests.adapters.HTTPAdapter()
                adapter = _HostRouter(adapter, direct, self.hosts)  # type: ignore[arg-type]
            session.mount(prefix, adapter)

    def undo(self) -> None:
        """Stop patching sessions created from now on. Idempotent. Sessions
        created while active keep their tunnel adapters."""
        _unregister(self)

    def __enter__(self) -> "RequestsPatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


# _patch_lock guards _active_patches and the (un)installing of the wrapper.
_patch_lock = threading.Lock()
_active_patches: List[RequestsPatch] = []
_original_session_init: Optional[Callable[..., None]] = None


def _patched_session_init(self: requests.Session, *args: Any, **kwargs: Any) -> None:
    assert _original_session_init is not None
    _original_session_init(self, *args, **kwargs)
    with _patch_lock:
        patches = list(_active_patches)
    for patch in patches:
        patch.mount(self)


def _register(patch: RequestsPatch) -> None:
    global _original_session_init
    with _patch_lock:
        if not _active_patches and requests.Session.__init__ is not _patched_session_init:
            _original_session_init = requests.Session.__init__
            requests.Session.__init__ = _patched_session_init  # type: ignore[method-assign]
        _active_patches.append(patch)
        patch.active = True


def _unregister(patch: RequestsPatch) -> None:
    with _patch_lock:
        if not patch.active:
            return
        patch.active = False
        _active_patches.remove(patch)
        if _active_patches:
            return
        if requests.Session.__init__ is _patched_session_init:
            assert _original_session_init is not None
            requests.Session.__init__ = _original_session_init  # type: ignore[method-assign]
        else:
            # Someone patched on top of us: leave the chain alone; our wrapper
            # stays in it but mounts nothing while no patch is active.
            log.warning("requests.Session.__init__ was patched again; cannot restore it")


def patch_requests(dial: Dial, hosts: Optional[Iterable[str]] = None, *,
                   piper: Optional[Piper] = None) -> RequestsPatch:
    """Make ``requests.get(...)`` and every ``requests.Session`` created from
    now on send through ``dial``; only requests to ``hosts`` (``"name"``, any
    port, or ``"name:port"``) if given, the rest going out directly as before.

    Patches ``requests.Session.__init__`` until the returned handle's
    :meth:`~RequestsPatch.undo` is called or its ``with`` block ends; patches
    may nest and be undone in any order. Does not block.
    """
    patch = RequestsPatch(dial, hosts, piper)
    _register(patch)
    return patch
