"""Scale-out settings of the example server: peers from DNS, health, drain.

The ``remotedialer server`` options and ``make_app()`` arguments (and their
environment variables) for running several instances behind a Kubernetes
Service; see docs/deployment.rst, "Scale out on Kubernetes".

==========================  ==============================  ========================
option                      ``make_app`` argument           environment
==========================  ==============================  ========================
``--peers-from-dns NAME``   ``peers_from_dns``              ``REMOTEDIALER_PEERS_FROM_DNS``
``--peer-refresh S``        ``peer_refresh``                ``REMOTEDIALER_PEER_REFRESH``
``--dns-server HOST:PORT``  ``dns_server``                  ``REMOTEDIALER_DNS_SERVER``
``--token-file PATH``       ``token_file``                  ``REMOTEDIALER_TOKEN_FILE``
``--drain-seconds S``       ``drain_seconds``               ``REMOTEDIALER_DRAIN_SECONDS``
==========================  ==============================  ========================

With discovery, this instance's peer id is ``--id`` (``REMOTEDIALER_ID``),
else ``POD_IP`` (``POD_IP:PORT`` when its port is not the name's default
port: see :mod:`remotedialer.discovery`).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..ha.discovery import DEFAULT_REFRESH, DnsPeerDiscovery, DnsResolver, parse_dns_name, parse_dns_server
from ..ha.lifecycle import DEFAULT_DRAIN_SECONDS, GracefulShutdown

__all__ = [
    "DEFAULT_PORT",
    "ScaleOut",
    "add_arguments",
    "read_token_file",
    "start_discovery",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8123
"""The port peers listen on when ``NAME`` gives none (``make_app``: the
process cannot know the port gunicorn binds)."""


def read_token_file(path: str) -> str:
    """The token in ``path`` (a mounted Secret), surrounding whitespace
    stripped. Raises ``ValueError`` if it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file: {exc}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


@dataclass
class ScaleOut:
    """The scale-out settings; :meth:`from_environment` fills what is ``None``."""

    peers_from_dns: Optional[str] = None
    peer_refresh: Optional[float] = None
    dns_server: Optional[str] = None
    token_file: Optional[str] = None
    drain_seconds: Optional[float] = None

    def from_environment(self) -> "ScaleOut":
        """A copy with each unset setting taken from its environment variable."""

        def pick(value: Any, name: str, default: Any) -> Any:
            return value if value is not None else os.environ.get(name) or default

        return ScaleOut(
            peers_from_dns=pick(self.peers_from_dns, "REMOTEDIALER_PEERS_FROM_DNS", ""),
            peer_refresh=float(pick(self.peer_refresh, "REMOTEDIALER_PEER_REFRESH", DEFAULT_REFRESH)),
            dns_server=pick(self.dns_server, "REMOTEDIALER_DNS_SERVER", ""),
            token_file=pick(self.token_file, "REMOTEDIALER_TOKEN_FILE", ""),
            drain_seconds=float(
                pick(self.drain_seconds, "REMOTEDIALER_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS)
            ),
        )

    def token(self, given: str) -> str:
        """The peer token: ``given`` (``--token`` or ``REMOTEDIALER_TOKEN``),
        else the token file's."""
        if given or not self.token_file:
            return given
        return read_token_file(self.token_file)

    def peer_id(self, given: str) -> str:
        """This instance's peer id: ``given``, else ``POD_IP`` when
        discovering peers."""
        if given or not self.peers_from_dns:
            return given
        return os.environ.get("POD_IP", "")

    def shutdown_for(self, server: Any, discovery: Optional[DnsPeerDiscovery]) -> GracefulShutdown:
        """The health endpoints and graceful shutdown of ``server``."""
        return GracefulShutdown(server, drain_seconds=self.drain_seconds or 0.0, discovery=discovery)


def start_discovery(
    server: Any, settings: ScaleOut, default_port: int = DEFAULT_PORT
) -> Optional[DnsPeerDiscovery]:
    """Start discovering ``server``'s peers from DNS, if asked to; ``None``
    otherwise. Raises ``ValueError`` for bad settings (no id or token, a
    malformed name or DNS server) and ``ImportError`` (saying what to
    install) without dnspython."""
    if not settings.peers_from_dns:
        return None
    scheme, name, port = parse_dns_name(settings.peers_from_dns, default_port)
    nameserver = parse_dns_server(settings.dns_server) if settings.dns_server else None
    if not server.peer_id or not server.peer_token:
        raise ValueError("--peers-from-dns needs this instance's id (--id or POD_IP) and a token "
                         "(--token, REMOTEDIALER_TOKEN or --token-file)")
    resolver = DnsResolver(nameserver)
    discovery = DnsPeerDiscovery(
        server, name, port, refresh=settings.peer_refresh or DEFAULT_REFRESH,
        scheme=scheme, lookup=resolver.endpoints,
    )
    source = f"DNS server {settings.dns_server}" if nameserver else "system resolver"
    log.info("discovering peers from %s (port %d, every %gs, %s) as %s", name, port,
             discovery.refresh_interval, source, server.peer_id)
    discovery.start()
    return discovery


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out options of ``remotedialer server``."""
    group = parser.add_argument_group("scale out (Kubernetes)")
    group.add_argument("--peers-from-dns", default=None, metavar="NAME[:PORT]",
                       help="peer with every instance DNS lists for NAME (a headless Service; SRV "
                            "records give ports; PORT defaults to the listen port; wss://NAME for TLS)")
    group.add_argument("--peer-refresh", type=float, default=None, metavar="SECONDS",
                       help=f"resolve NAME this often (default {DEFAULT_REFRESH:g})")
    group.add_argument("--dns-server", default=None, metavar="HOST[:PORT]",
                       help="ask this DNS server instead of the system resolver")
    group.add_argument("--token-file", default=None, metavar="PATH",
                       help="read the peer token from this file (a mounted Secret)")
    group.add_argument("--drain-seconds", type=float, default=None, metavar="SECONDS",
                       help="on SIGTERM, fail /readyz and refuse new tunnels this long before closing "
                            f"the tunnels (default {DEFAULT_DRAIN_SECONDS:g})")


def from_args(args: argparse.Namespace) -> ScaleOut:
    """The settings given on the command line (``None``: not given)."""
    return ScaleOut(args.peers_from_dns, args.peer_refresh, args.dns_server, args.token_file,
                    args.drain_seconds)
