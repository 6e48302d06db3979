"""The official ``kubernetes`` client through a tunnel.

Reaching a cluster's API server through the agent that runs in it::

    from kubernetes import client
    from remotedialer.integrations.kubernetes import tunneled_api_client

    configuration = client.Configuration()
    configuration.host = "https://kubernetes.default.svc"  # as the agent sees it
    configuration.ssl_ca_cert = "cluster-7-ca.crt"
    configuration.api_key = {"authorization": token}
    configuration.api_key_prefix = {"authorization": "Bearer"}

    with tunneled_api_client(server.dialer("cluster-7"), configuration) as api:
        pods = client.CoreV1Api(api).list_namespaced_pod("default", _request_timeout=10)

The kubernetes client sends every request through one urllib3 pool manager
(``api_client.rest_client.pool_manager``); here it is a
:class:`~remotedialer.integrations.requests.TunnelPoolManager` built with the
TLS settings the client computed from its configuration (CA, client
certificate, ``verify_ssl``, ``tls_server_name``, retries). Names are resolved
by the agent, TLS runs end to end with the API server, connections are kept
alive and reused. ``configuration.proxy`` cannot be combined with it: the
tunnel is the route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from ..piping import Piper
from .requests import Dial, TunnelPoolManager

if TYPE_CHECKING:  # the kubernetes package is imported by the caller's code
    from kubernetes.client import ApiClient, Configuration

__all__ = ["tunneled_api_client", "route_through_tunnel"]


def tunneled_api_client(
    dial: Dial, configuration: Optional["Configuration"] = None, *, piper: Optional[Piper] = None
) -> "ApiClient":
    """A ``kubernetes.client.ApiClient`` for ``configuration`` (default: the
    client's default configuration) whose connections all come from ``dial``
    (``server.dialer(client_key)``, ``session.dial``, ...). ``piper`` copies
    for https connections (default: the process-wide one). Close it (or use
    it in a ``with`` block) to close its tunneled connections. Raises
    ``ValueError`` when the configuration sets a proxy."""
    from kubernetes.client import ApiClient

    api = ApiClient(configuration)
    try:
        route_through_tunnel(api, dial, piper=piper)
    except BaseException:
        close: Callable[[], None] = api.close  # unannotated in kubernetes' types, Any without them
        close()
        raise
    return api


def route_through_tunnel(api_client: "ApiClient", dial: Dial, *, piper: Optional[Piper] = None) -> None:
    """Make an existing ``ApiClient`` send through ``dial`` from now on (its
    idle connections are closed). Raises ``ValueError`` when its configuration
    sets a proxy."""
    rest = api_client.rest_client
    current = rest.pool_manager
    if getattr(current, "proxy", None) is not None:
        raise ValueError(
            "a tunneled kubernetes client does not use configuration.proxy: the tunnel is the route"
        )
    rest.pool_manager = TunnelPoolManager(dial, piper=piper, **current.connection_pool_kw)
    current.clear()
