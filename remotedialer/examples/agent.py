"""The example agent (``remotedialer client``): a :class:`~remotedialer.client.TunnelClient`
that sends ``X-Tunnel-ID`` and lets the server dial anything, as the Go
example's client does."""

from __future__ import annotations

import ssl
from typing import Optional

from ..client import TunnelClient

__all__ = ["make_client", "allow_all"]


def allow_all(proto: str, address: str) -> bool:
    """A dial authorizer that allows every dial (the examples' open relay)."""
    return True


def make_client(url: str, client_id: str, ssl_context: Optional[ssl.SSLContext] = None) -> TunnelClient:
    """The example client: ``X-Tunnel-ID: client_id``, every dial allowed."""
    return TunnelClient(url, {"X-Tunnel-ID": client_id}, allow_all, ssl_context=ssl_context)
