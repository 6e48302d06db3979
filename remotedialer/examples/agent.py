"""The example agent (``remotedialer client``): a :class:`~remotedialer.client.TunnelClient`
that sends ``X-Tunnel-ID`` and lets the server dial anything, as the Go
example's client does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..client import TunnelClient
from ..config import DEFAULT_LIMITS
from ..errors import ConfigurationError, error_text

if TYPE_CHECKING:
    import ssl

__all__ = ["make_client", "allow_all", "tls_context"]


def allow_all(proto: str, address: str) -> bool:
    """A dial authorizer that allows every dial (the examples' open relay)."""
    return True


def make_client(url: str, client_id: str, ssl_context: Optional[ssl.SSLContext] = None,
                proxy: Optional[str] = None, secret: Optional[str] = None,
                resume_window: float = DEFAULT_LIMITS.resume_window) -> TunnelClient:
    """The example client: ``X-Tunnel-ID: client_id`` (and ``Authorization:
    Bearer secret`` with a ``secret``), every dial allowed; ``proxy`` as
    :class:`~remotedialer.client.TunnelClient` takes it; ``resume_window``
    above 0 offers resumption (docs/protocol.rst; default
    :attr:`Limits.resume_window <remotedialer.config.Limits.resume_window>`, 0: off). Raises
    :class:`~remotedialer.errors.ConfigurationError` for settings that cannot work."""
    headers = {"X-Tunnel-ID": client_id}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    return TunnelClient(url, headers, allow_all, ssl_context=ssl_context, proxy=proxy,
                        limits=DEFAULT_LIMITS.replace(resume_window=resume_window))


def tls_context(cacert: Optional[str], insecure: bool, cert: Optional[str] = None,
                key: Optional[str] = None) -> Optional[ssl.SSLContext]:
    """The TLS context for a CA file and/or no verification, and a client
    certificate ``cert`` (its key in ``key`` or in ``cert``) to present
    (``None``: the default context). Raises
    :class:`~remotedialer.errors.ConfigurationError` for a CA file that is
    missing or holds no PEM certificate, or a certificate that cannot be used."""
    if not cacert and not insecure and not cert:
        return None
    import ssl  # only here: a ws:// agent's CLI need not load it

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
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"--cert {cert}: {error_text(exc)}") from None
    return context
