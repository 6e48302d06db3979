"""The example agent (``remotedialer client``): a :class:`~remotedialer.client.TunnelClient`
that sends ``X-Tunnel-ID`` and lets the server dial anything, as the Go
example's client does."""

from __future__ import annotations

import ssl
from typing import Optional

from ..client import TunnelClient
from ..errors import ConfigurationError, error_text

__all__ = ["make_client", "allow_all", "tls_context"]


def allow_all(proto: str, address: str) -> bool:
    """A dial authorizer that allows every dial (the examples' open relay)."""
    return True


def make_client(url: str, client_id: str, ssl_context: Optional[ssl.SSLContext] = None,
                proxy: Optional[str] = None) -> TunnelClient:
    """The example client: ``X-Tunnel-ID: client_id``, every dial allowed;
    ``proxy`` as :class:`~remotedialer.client.TunnelClient` takes it. Raises
    :class:`~remotedialer.errors.ConfigurationError` for settings that cannot work."""
    return TunnelClient(url, {"X-Tunnel-ID": client_id}, allow_all, ssl_context=ssl_context, proxy=proxy)


def tls_context(cacert: Optional[str], insecure: bool) -> Optional[ssl.SSLContext]:
    """The TLS context for a CA file and/or no verification (``None``: the
    default one). Raises :class:`~remotedialer.errors.ConfigurationError`
    for a CA file that is missing or holds no PEM certificate."""
    if not cacert and not insecure:
        return None
    try:
        context = ssl.create_default_context(cafile=cacert)
    except FileNotFoundError:
        raise ConfigurationError(f"--cacert {cacert}: no such file") from None
    except ssl.SSLError as exc:
        raise ConfigurationError(f"--cacert {cacert}: no PEM certificate in it ({exc.reason})") from None
    except OSError as exc:
        raise ConfigurationError(f"--cacert {cacert}: {error_text(exc)}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
