"""Peer discovery from DNS: parsing, the dnspython lookup against a real DNS
server on loopback (dnslib) whose answers change, and the peering it drives
on a real :class:`~remotedialer.server.Server`."""

from __future__ import annotations

import logging
import sys
from typing import Iterator, List, Tuple

import pytest

from testkit.dns import ZoneServer
from remotedialer.ha.discovery import (
    DiscoveryError,
    DnsPeerDiscovery,
    DnsResolver,
    Endpoint,
    parse_dns_name,
    parse_dns_server,
)
from remotedialer.ha.peering import PEER_ID_HEADER, PEER_TOKEN_HEADER
from remotedialer.server import Server

NAME = "peers.test"


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    with ZoneServer() as server:
        yield server


def test_parse_dns_name() -> None:
    assert parse_dns_name("peers.ns.svc", 8123) == ("ws", "peers.ns.svc", 8123)
    assert parse_dns_name("peers:9000", 8123) == ("ws", "peers", 9000)
    assert parse_dns_name("wss://peers", 8123) == ("wss", "peers", 8123)
    assert parse_dns_name("wss://peers:443", 1) == ("wss", "peers", 443)
    for bad in ("", ":80", "peers:0", "peers:x", "http://peers", "peers:70000"):
        with pytest.raises(ValueError):
            parse_dns_name(bad, 8123)


def test_parse_dns_server() -> None:
    assert parse_dns_server("10.0.0.10") == ("10.0.0.10", 53)
    assert parse_dns_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_dns_server("[::1]:5353") == ("::1", 5353)
    assert parse_dns_server("::1") == ("::1", 53)
    for bad in ("dns.example:53", "[::1", "127.0.0.1:", "127.0.0.1:99999"):
        with pytest.raises(ValueError):
            parse_dns_server(bad)


def test_endpoint_ids_and_urls() -> None:
    assert Endpoint("10.1.2.3", 8123).peer_id(8123) == "10.1.2.3"
    assert Endpoint("127.0.0.1", 9001).peer_id(8123) == "127.0.0.1:9001"
    assert Endpoint("fd00::5", 8123).peer_id(8123) == "fd00::5"
    assert Endpoint("::1", 9001).peer_id(8123) == "[::1]:9001"
    assert Endpoint("::1", 9001).url("wss") == "wss://[::1]:9001/connect"
    assert Endpoint("10.1.2.3", 8123).url() == "ws://10.1.2.3:8123/connect"


@pytest.mark.parametrize("glue", [True, False], ids=["srv-with-glue", "srv-resolve-targets"])
def test_resolver_uses_srv_ports(zone: ZoneServer, glue: bool) -> None:
    zone.glue = glue
    resolver = DnsResolver(zone.address)
    assert resolver.endpoints(NAME, 8123) == set()  # NXDOMAIN: no peers
    zone.set_endpoints(NAME, [("127.0.0.1", 9001), ("127.0.0.1", 9002), ("::1", 9003)])
    assert resolver.endpoints(NAME, 8123) == {
        Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002), Endpoint("::1", 9003)
    }
    zone.set_endpoints(NAME, [("127.0.0.1", 9002)])
    assert resolver.endpoints(NAME, 8123) == {Endpoint("127.0.0.1", 9002)}


def test_resolver_without_srv_uses_a_and_aaaa_on_the_default_port(zone: ZoneServer) -> None:
    zone.set_endpoints(NAME, [("127.0.0.1", 1), ("::1", 1)], srv=False)
    assert DnsResolver(zone.address).endpoints(NAME, 8123) == {
        Endpoint("127.0.0.1", 8123), Endpoint("::1", 8123)
    }


def test_resolver_failure_is_a_discovery_error(zone: ZoneServer) -> None:
    zone.set_endpoints(NAME, [("127.0.0.1", 9001)])
    zone.fail()
    with pytest.raises(DiscoveryError) as info:
        DnsResolver(zone.address, timeout=1).endpoints(NAME, 8123)
    assert isinstance(info.value, OSError)
    assert NAME in str(info.value)


@pytest.fixture
def server() -> Iterator[Server]:
    server = Server(lambda request: ("", False), peer_id="127.0.0.1:9001", peer_token="s3cret")
    yield server
    server.close()


def peers_of(server: Server) -> List[Tuple[str, str]]:
    """The peers ``server`` links to, each also accepted with the shared token."""
    links = [(link.spec.peer_id, link.spec.url) for link in server.peering.links()]
    for peer_id, _ in links:
        headers = {PEER_ID_HEADER: peer_id, PEER_TOKEN_HEADER: "s3cret"}
        assert server.peering.authenticate(headers) == peer_id
    return sorted(links)


def test_discovery_adds_and_removes_peers_and_skips_itself(zone: ZoneServer, server: Server) -> None:
    discovery = DnsPeerDiscovery(server, NAME, 8123, lookup=DnsResolver(zone.address).endpoints)
    server.add_peer("ws://127.0.0.1:7000/connect", "by-hand", "s3cret")
    zone.set_endpoints(NAME, [("127.0.0.1", 9001), ("127.0.0.1", 9002), ("127.0.0.1", 9003)])
    assert discovery.refresh()
    assert peers_of(server) == [
        ("127.0.0.1:9002", "ws://127.0.0.1:9002/connect"),
        ("127.0.0.1:9003", "ws://127.0.0.1:9003/connect"),
        ("by-hand", "ws://127.0.0.1:7000/connect"),
    ]
    assert discovery.peer_ids() == {"127.0.0.1:9002", "127.0.0.1:9003"}

    zone.set_endpoints(NAME, [("127.0.0.1", 9001), ("127.0.0.1", 9003), ("127.0.0.1", 9004)])
    assert discovery.refresh()
    assert [peer for peer, _url in peers_of(server)] == ["127.0.0.1:9003", "127.0.0.1:9004", "by-hand"]
    removed = {PEER_ID_HEADER: "127.0.0.1:9002", PEER_TOKEN_HEADER: "s3cret"}
    assert server.peering.authenticate(removed) is None  # a removed peer is refused from now on

    zone.set_endpoints(NAME, [])  # the name is gone: no discovered peers
    assert discovery.refresh()
    assert [peer for peer, _url in peers_of(server)] == ["by-hand"]


def test_resolver_failure_keeps_the_last_good_peers(
    zone: ZoneServer, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    discovery = DnsPeerDiscovery(server, NAME, 8123, lookup=DnsResolver(zone.address, timeout=1).endpoints)
    zone.set_endpoints(NAME, [("127.0.0.1", 9002)])
    assert discovery.refresh()
    zone.fail()
    with caplog.at_level(logging.WARNING, logger="remotedialer.ha.discovery"):
        assert not discovery.refresh()
    assert "keeping 1 peer(s)" in caplog.text
    assert isinstance(discovery.last_error, DiscoveryError)
    assert [peer for peer, _url in peers_of(server)] == ["127.0.0.1:9002"]
    zone.fail(False)
    zone.set_endpoints(NAME, [("127.0.0.1", 9003)])
    assert discovery.refresh()
    assert discovery.last_error is None
    assert [peer for peer, _url in peers_of(server)] == ["127.0.0.1:9003"]


def test_default_port_peers_are_named_by_address(zone: ZoneServer) -> None:
    """On Kubernetes every pod listens on the same port: ids are the pod IPs
    and POD_IP excludes the instance itself."""
    server = Server(lambda request: ("", False), peer_id="127.0.0.1", peer_token="t")
    try:
        discovery = DnsPeerDiscovery(server, NAME, 8123, scheme="wss",
                                     lookup=DnsResolver(zone.address).endpoints)
        zone.set_endpoints(NAME, [("127.0.0.1", 8123), ("::1", 8123)], srv=False)
        assert discovery.refresh()
        assert [(link.spec.peer_id, link.spec.url) for link in server.peering.links()] == [
            ("::1", "wss://[::1]:8123/connect")
        ]
    finally:
        server.close()


def test_discovery_thread_follows_the_records(zone: ZoneServer, server: Server) -> None:
    discovery = DnsPeerDiscovery(server, NAME, 8123, refresh=0.05,
                                 lookup=DnsResolver(zone.address).endpoints)
    discovery.start()
    try:
        from testkit.support import wait_for

        zone.set_endpoints(NAME, [("127.0.0.1", 9002)])
        wait_for(lambda: discovery.peer_ids() == {"127.0.0.1:9002"})
        zone.set_endpoints(NAME, [("127.0.0.1", 9005)])
        wait_for(lambda: discovery.peer_ids() == {"127.0.0.1:9005"})
        assert discovery.running
    finally:
        discovery.stop()
    assert not discovery.running


def test_discovery_needs_an_id_and_a_token() -> None:
    server = Server(lambda request: ("", False))
    try:
        with pytest.raises(ValueError, match="peer id"):
            DnsPeerDiscovery(server, NAME, 8123, lookup=lambda name, port: [])
        with pytest.raises(ValueError, match="scheme"):
            DnsPeerDiscovery(server, NAME, 8123, token="t", self_id="a", scheme="http",
                             lookup=lambda name, port: [])
    finally:
        server.close()


def test_missing_dnspython_is_explained(monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    from remotedialer.cli import main

    monkeypatch.setitem(sys.modules, "dns", None)
    monkeypatch.setitem(sys.modules, "dns.resolver", None)
    with pytest.raises(ImportError, match=r"needs dnspython \(the k8s extra\): pip install dnspython"):
        DnsResolver()
    with caplog.at_level(logging.ERROR):
        status = main(["server", "--listen", "127.0.0.1:0", "--id", "a", "--token", "t",
                       "--peers-from-dns", NAME])
    assert status == 2
    assert "pip install dnspython" in caplog.text
