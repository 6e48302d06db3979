"""An ``httpx`` transport over a dial function (optional: needs
``pip install '.[httpx]'`` from a checkout).

``httpx.Client(transport=TunnelTransport(dial))`` sends every request of the
client through ``dial(proto, address, timeout)``, for instance
``server.dialer("client-1")``. It is an httpcore connection pool on
:class:`~remotedialer.integrations.httpcore.TunnelBackend`, so connections are
kept alive and reused, host names are resolved on the far side and https runs
the standard ``ssl`` module over :func:`~remotedialer.bridge.as_socket`, with
``verify`` doing the verification as in ``httpx.HTTPTransport``. Sync only.

Only public httpx and httpcore API is used: requests and responses are
converted here, and httpcore's exceptions become httpx's of the same name
(``httpx.ConnectError`` for a failed dial, ``httpx.ReadTimeout``, ...).
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Iterator, Optional, Union

import httpcore
import httpx

from ..piping import Piper
from .httpcore import TunnelBackend
from .requests import Dial

__all__ = ["TunnelTransport"]

Verify = Union[ssl.SSLContext, str, bool]


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """Raise httpcore's exceptions as the httpx exception of the same name
    (the nearest one up the class tree), as httpx's own transport does."""
    try:
        yield
    except httpcore.ConnectionNotAvailable as exc:  # no httpx twin: the pool is exhausted
        raise httpx.PoolTimeout(str(exc)) from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "httpcore":
            raise
        for kind in type(exc).__mro__:
            twin = getattr(httpx, kind.__name__, None)
            if isinstance(twin, type) and issubclass(twin, httpx.TransportError):
                raise twin(str(exc)) from exc
        raise httpx.TransportError(str(exc)) from exc


class _ResponseStream(httpx.SyncByteStream):
    """An httpcore response body as an httpx stream."""

    def __init__(self, stream: httpcore.Response) -> None:
        self._response = stream

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            yield from self._response.iter_stream()

    def close(self) -> None:
        self._response.close()


class TunnelTransport(httpx.BaseTransport):
    """An httpx transport whose connections come from ``dial``.

    ``verify`` is an ``ssl.SSLContext``, a CA bundle path, or a bool, as in
    ``httpx.HTTPTransport``; ``limits`` bounds the pool; ``retries`` retries
    failed connects; ``piper`` copies for https connections (default: the
    process-wide one). Use as a context manager or :meth:`close` it.
    """

    def __init__(
        self,
        dial: Dial,
        *,
        verify: Verify = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),
        retries: int = 0,
        piper: Optional[Piper] = None,
    ) -> None:
        if isinstance(verify, ssl.SSLContext):
            ssl_context = verify
        elif isinstance(verify, str):
            ssl_context = ssl.create_default_context(cafile=verify)
        elif verify:
            ssl_context = ssl.create_default_context()
        else:
            ssl_context = ssl.create_default_context()
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        self.pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            network_backend=TunnelBackend(dial, piper),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the tunnel; blocks per the request's
        timeouts. Raises httpx's transport errors (``httpx.ConnectError``
        when the dial fails, ``httpx.ReadTimeout``, ...)."""
        if not isinstance(request.stream, httpx.SyncByteStream):
            raise TypeError("TunnelTransport is sync: use httpx.Client, not AsyncClient")
        url = request.url
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = self.pool.handle_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        """Close every pooled connection."""
        self.pool.close()
