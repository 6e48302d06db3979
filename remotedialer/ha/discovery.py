"""Peers found through DNS: a headless Kubernetes Service as the peer list.

:class:`DnsPeerDiscovery` resolves one DNS name every ``refresh`` seconds and
keeps the server's peering (:meth:`remotedialer.server.Server.add_peer` /
``remove_peer``) equal to what the name lists, minus this instance:

* SRV records of the name, when it has some, give each instance's address
  (the target's A/AAAA records, from the answer's additional section or
  resolved) and its port;
* otherwise the name's A and AAAA records give the addresses, all on the
  default port.

Each endpoint's peer id is its address (``10.1.2.3``, ``fd00::5``) when its
port is the default port, and ``address:port`` (``127.0.0.1:8124``,
``[::1]:8124``) otherwise; its URL is ``ws://address:port/connect`` (or
``wss://``). Every instance must therefore be given the id the others compute
for it (Kubernetes: ``POD_IP`` and one port for all): the endpoint whose id
is our own is left out, which is how an instance excludes itself by address
and port. Peers added by hand (``--peers``) are left alone.

A name that does not exist (NXDOMAIN) or has no records is an answer: no
peers. A resolver failure (timeout, SERVFAIL, no server reachable) keeps the
last good set and is logged; so is every change.

Needs dnspython (the ``k8s`` extra: ``pip install dnspython``); the system resolver
(``/etc/resolv.conf``, with its search domains) is used unless a DNS server
is given.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Iterable, Optional, Set, Tuple

from ..addresses import join_host_port, split_remote_address
from ..errors import RemotedialerError

if TYPE_CHECKING:
    from ..server.tunnel_server import Server

__all__ = [
    "DEFAULT_REFRESH",
    "DNS_EXTRA_HINT",
    "DiscoveryError",
    "DnsPeerDiscovery",
    "DnsResolver",
    "Endpoint",
    "parse_dns_name",
    "parse_dns_server",
]

log = logging.getLogger(__name__)

DEFAULT_REFRESH = 15.0
"""Seconds between two resolutions of the peer name."""

DEFAULT_DNS_TIMEOUT = 2.0
"""Seconds one resolution may take in all (every query and retry)."""

DNS_EXTRA_HINT = "peer discovery from DNS needs dnspython (the k8s extra): pip install dnspython"
"""What to install when dnspython is missing (shown by the CLI and in errors)."""


class DiscoveryError(RemotedialerError, OSError):
    """The peer name could not be resolved (the last good peers are kept)."""


@dataclass(frozen=True, order=True)
class Endpoint:
    """One server instance found in DNS: an IP address and a port."""

    address: str
    port: int

    def peer_id(self, default_port: int) -> str:
        """The address alone on the default port, else ``address:port``."""
        return self.address if self.port == default_port else join_host_port(self.address, self.port)

    def url(self, scheme: str = "ws") -> str:
        """The endpoint's connect URL."""
        return f"{scheme}://{join_host_port(self.address, self.port)}/connect"


def _split_port(text: str, what: str) -> Tuple[str, Optional[int]]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address
    -> (host, port or None); the host may not be empty nor the port 0."""
    text = text.strip()
    try:
        return split_remote_address(text)
    except ValueError as exc:
        raise ValueError(f"invalid {what} {text!r}: {exc}") from None


def parse_dns_name(text: str, default_port: int) -> Tuple[str, str, int]:
    """Parse ``--peers-from-dns [ws://|wss://]NAME[:PORT]`` into ``(scheme,
    name, port)``; the scheme defaults to ``ws``, the port to
    ``default_port``. Raises ``ValueError`` if malformed."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep:
        scheme, rest = "ws", text
    elif scheme not in ("ws", "wss"):
        raise ValueError(f"invalid peer DNS name {text!r}: the scheme is ws or wss")
    name, port = _split_port(rest, "peer DNS name")
    return scheme, name, default_port if port is None else port


def parse_dns_server(text: str) -> Tuple[str, int]:
    """Parse ``--dns-server HOST[:PORT]`` (``[::1]:5353`` for IPv6 with a
    port); the port defaults to 53. Raises ``ValueError`` if malformed or if
    HOST is not an IP address."""
    host, port = _split_port(text, "DNS server")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"invalid DNS server {text!r}: HOST must be an IP address") from None
    return host, 53 if port is None else port


def _import_dns() -> Any:
    try:
        import dns.resolver
    except ImportError as exc:
        raise ImportError(DNS_EXTRA_HINT) from exc
    return dns


class DnsResolver:
    """Looks up the endpoints of one name with dnspython.

    ``nameserver`` is ``(ip, port)``; ``None`` uses the system configuration
    (``/etc/resolv.conf``, search domains included). Each lookup takes at
    most ``timeout`` seconds. Raises ``ImportError`` (saying what to
    install) without dnspython.
    """

    def __init__(self, nameserver: Optional[Tuple[str, int]] = None,
                 timeout: float = DEFAULT_DNS_TIMEOUT) -> None:
        dns = _import_dns()
        self._dns = dns
        if nameserver is None:
            self._resolver = dns.resolver.Resolver()
            self._search = True
        else:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [nameserver[0]]
            self._resolver.port = nameserver[1]
            self._search = False
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout

    def endpoints(self, name: str, default_port: int) -> Set[Endpoint]:
        """The endpoints ``name`` lists now: from its SRV records if it has
        any, else its A/AAAA records on ``default_port``. An empty set when
        the name does not exist or has no records. Blocks for at most the
        resolver's timeout per query; raises :class:`DiscoveryError` when
        the resolver fails."""
        errors = self._dns.resolver
        try:
            try:
                srv = self._query(name, "SRV")
            except errors.NXDOMAIN:  # some servers only know the name's SRV under _port._tcp
                srv = None
            if srv is None:
                return {Endpoint(address, default_port) for address in self._addresses(name)}
            found: Set[Endpoint] = set()
            glue = self._glue(srv)
            for record in srv:
                target = record.target.to_text()
                addresses = glue.get(target.lower())
                if addresses is None:
                    addresses = self._addresses(target)
                found.update(Endpoint(address, int(record.port)) for address in addresses)
            return found
        except errors.NXDOMAIN:
            return set()
        except self._dns.exception.DNSException as exc:
            raise DiscoveryError(f"resolving {name}: {exc.__class__.__name__}: {exc}") from exc

    def _query(self, name: str, rdtype: str) -> Any:
        """The answer to one query, or ``None`` for no records of that type."""
        try:
            return self._resolver.resolve(name, rdtype, search=self._search)
        except self._dns.resolver.NoAnswer:
            return None

    def _addresses(self, name: str) -> Set[str]:
        """A and AAAA addresses of ``name`` (a missing name raises NXDOMAIN)."""
        addresses: Set[str] = set()
        for rdtype in ("A", "AAAA"):
            answer = self._query(name, rdtype)
            if answer is not None:
                addresses.update(record.address for record in answer)
        return addresses

    def _glue(self, answer: Any) -> Dict[str, Set[str]]:
        """A/AAAA records the server added to an SRV answer, by lower-case name."""
        rdatatype = self._dns.rdatatype
        glue: Dict[str, Set[str]] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype in (rdatatype.A, rdatatype.AAAA):
                glue.setdefault(rrset.name.to_text().lower(), set()).update(
                    record.address for record in rrset
                )
        return glue


Lookup = Callable[[str, int], Iterable[Endpoint]]
"""``lookup(name, default_port)``: endpoints, or raise :class:`DiscoveryError`."""


class DnsPeerDiscovery:
    """Keeps ``server``'s peers equal to the instances DNS lists for ``name``.

    ``self_id`` is this instance's peer id (the server's ``peer_id`` by
    default); the endpoint with that id is skipped. ``token`` is the token
    shared by all instances (the server's ``peer_token`` by default);
    ``scheme`` is ``ws`` or ``wss`` (peer TLS settings are the server's).
    ``lookup`` replaces the DNS lookup (default: a :class:`DnsResolver`
    on the system configuration). Call :meth:`start` and :meth:`stop`, or
    :meth:`refresh` to resolve once on the calling thread.
    """

    def __init__(
        self,
        server: "Server",
        name: str,
        port: int,
        *,
        refresh: float = DEFAULT_REFRESH,
        token: Optional[str] = None,
        self_id: Optional[str] = None,
        scheme: str = "ws",
        lookup: Optional[Lookup] = None,
    ) -> None:
        if scheme not in ("ws", "wss"):
            raise ValueError(f"invalid peer scheme {scheme!r}: ws or wss")
        if refresh <= 0:
            raise ValueError("the refresh interval must be positive")
        self.server = server
        self.name = name
        self.port = port
        self.refresh_interval = refresh
        self.token = token or server.peer_token or ""
        self.self_id = self_id or server.peer_id or ""
        if not self.token or not self.self_id:
            raise ValueError("peer discovery needs this server's peer id and the shared token")
        self.scheme = scheme
        self._lookup: Lookup = lookup or DnsResolver().endpoints
        self._lock = threading.Lock()  # guards _peers
        self._apply_lock = threading.Lock()  # one refresh changes the peering at a time
        self._peers: Dict[str, str] = {}  # peer id -> URL, the peers we added
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        #: Why the last resolution failed (``None`` after a good one).
        self.last_error: Optional[DiscoveryError] = None
        #: ``time.monotonic()`` of the last good resolution (0: none yet).
        self.last_success = 0.0

    def __repr__(self) -> str:
        return f"<DnsPeerDiscovery {self.name}:{self.port} peers={sorted(self.peer_ids())}>"

    def peer_ids(self) -> FrozenSet[str]:
        """The ids of the peers discovered (and added) so far."""
        with self._lock:
            return frozenset(self._peers)

    def refresh(self) -> bool:
        """Resolve the name once and add/remove peers to match; False (and
        the last good peers kept) if the resolver failed. Blocks on the DNS
        lookup (bounded by its timeout)."""
        try:
            endpoints = sorted(self._lookup(self.name, self.port))
        except DiscoveryError as exc:
            if self.last_error is None or str(exc) != str(self.last_error):
                log.warning("peer discovery failed, keeping %d peer(s): %s", len(self._peers), exc)
            self.last_error = exc
            return False
        if self.last_error is not None:
            log.info("peer discovery of %s works again", self.name)
        self.last_error = None
        wanted = {
            endpoint.peer_id(self.port): endpoint.url(self.scheme)
            for endpoint in endpoints
        }
        wanted.pop(self.self_id, None)
        self._apply(wanted)
        self.last_success = time.monotonic()
        return True

    def _apply(self, wanted: Dict[str, str]) -> None:
        """Make the peers we added equal to ``wanted`` (id -> URL). Changes
        are made one refresh at a time (``_apply_lock``); ``_lock`` is only
        held to update ``_peers``, so readers never wait for a link to stop."""
        with self._apply_lock:
            if self._stop.is_set():
                return
            with self._lock:
                current = dict(self._peers)
            for peer_id in current:
                if peer_id not in wanted:
                    log.info("peer %s left %s", peer_id, self.name)
                    self.server.remove_peer(peer_id)
                    with self._lock:
                        del self._peers[peer_id]
            for peer_id, url in wanted.items():
                if current.get(peer_id) != url:
                    log.info("peer %s found in %s at %s", peer_id, self.name, url)
                    self.server.add_peer(url, peer_id, self.token)
                    with self._lock:
                        self._peers[peer_id] = url

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # pragma: no cover - keep discovering whatever happens
                log.exception("peer discovery of %s failed", self.name)
            self._stop.wait(self.refresh_interval)

    def start(self) -> None:
        """Resolve now and then every ``refresh`` seconds, on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="remotedialer-discovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = DEFAULT_DNS_TIMEOUT + 1) -> None:
        """Stop resolving (peers found so far stay); waits for a lookup in
        progress at most ``timeout`` seconds."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the refresh thread is alive."""
        return self._thread is not None and self._thread.is_alive()

