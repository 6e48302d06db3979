"""Which proxy the agent uses (Go's ``http.ProxyFromEnvironment`` rules) and
the connection through one, against the loopback proxy of
:mod:`testkit.connect_proxy` (HTTP CONNECT and SOCKS5, real sockets)."""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator

import pytest
import trustme

from remotedialer.errors import ConfigurationError, ProxyError
from remotedialer.transports.proxy import (
    NoProxy,
    ProxyURL,
    connect_through_proxy,
    parse_proxy_url,
    proxy_from_environment,
)
from testkit.connect_proxy import ConnectProxy

TIMEOUT = 10.0


@pytest.mark.parametrize(
    "no_proxy, host, port, direct",
    [
        # names match themselves and their subdomains, on a label boundary
        ("foo.com", "foo.com", 80, True),
        ("foo.com", "bar.foo.com", 80, True),
        ("foo.com", "foofoo.com", 80, False),
        ("foo.com, .barbaz.net", "barbaz.net", 80, False),
        (".y.com", "x.y.com", 80, True),
        (".y.com", "y.com", 80, False),
        ("*.y.com", "y.com", 80, False),
        ("*.y.com", "x.y.com", 80, True),
        ("FOO.com", "Bar.Foo.COM", 443, True),
        # ports narrow an entry
        ("foo.com:8443", "foo.com", 8443, True),
        ("foo.com:8443", "foo.com", 443, False),
        ("1.2.3.4:80", "1.2.3.4", 80, True),
        ("1.2.3.4:80", "1.2.3.4", 81, False),
        # addresses and blocks match addresses; names never match addresses
        ("1.2.3.4", "1.2.3.4", 80, True),
        ("1.2.3.4", "1.2.3.5", 80, False),
        ("10.0.0.0/8", "10.20.30.40", 443, True),
        ("10.0.0.0/8", "11.0.0.1", 443, False),
        ("2001:db8::/32", "2001:db8::7", 443, True),
        ("[2001:db8::7]:443", "2001:db8::7", 443, True),
        ("example.com", "93.184.216.34", 80, False),
        # everything, and the loopback that is never proxied
        ("*", "anything.example", 80, True),
        ("", "localhost", 80, True),
        ("", "127.0.0.2", 80, True),
        ("", "::1", 80, True),
        ("", "::2", 80, False),
        ("", "localhost.net", 80, False),
        ("nonsense/99, ,", "example.com", 80, False),
    ],
)
def test_no_proxy_matches_as_go_does(no_proxy: str, host: str, port: int, direct: bool) -> None:
    assert NoProxy(no_proxy).bypasses(host, port) is direct


def env(**values: str) -> Dict[str, str]:
    return dict(values)


def test_ws_uses_http_proxy_and_wss_https_proxy() -> None:
    both = env(HTTP_PROXY="http://plain:3128", HTTPS_PROXY="http://secure:3129")
    assert proxy_from_environment(False, "server.example", 80, both) == ProxyURL("http", "plain", 3128)
    assert proxy_from_environment(True, "server.example", 443, both) == ProxyURL("http", "secure", 3129)
    assert proxy_from_environment(True, "server.example", 443, env(HTTP_PROXY="http://plain:3128")) is None
    assert proxy_from_environment(False, "server.example", 80, env(HTTPS_PROXY="http://s:1")) is None


def test_upper_case_wins_and_lower_case_counts() -> None:
    assert proxy_from_environment(
        False, "s.example", 80, env(HTTP_PROXY="http://upper:1", http_proxy="http://lower:2")
    ) == ProxyURL("http", "upper", 1)
    assert proxy_from_environment(
        False, "s.example", 80, env(HTTP_PROXY="", http_proxy="http://lower:2")
    ) == ProxyURL("http", "lower", 2)
    assert proxy_from_environment(
        True, "s.example", 443, env(https_proxy="socks5://sox", no_proxy="other.example")
    ) == ProxyURL("socks5", "sox", 1080)
    listed = env(https_proxy="http://p:1", no_proxy="s.example")
    assert proxy_from_environment(True, "s.example", 443, listed) is None
    assert proxy_from_environment(True, "s.example", 443, env(HTTPS_PROXY="http://p:1", NO_PROXY="*")) is None


def test_loopback_servers_never_use_the_environments_proxy() -> None:
    proxied = env(HTTP_PROXY="http://p:1", HTTPS_PROXY="http://p:1")
    for host in ("localhost", "127.0.0.1", "127.9.9.9", "::1"):
        assert proxy_from_environment(False, host, 8123, proxied) is None
        assert proxy_from_environment(True, host, 8443, proxied) is None


def test_cgi_refuses_http_proxy() -> None:
    with pytest.raises(ConfigurationError, match="HTTP_PROXY .*CGI"):
        proxy_from_environment(False, "s.example", 80, env(HTTP_PROXY="http://p:1", REQUEST_METHOD="GET"))
    assert proxy_from_environment(
        True, "s.example", 443, env(HTTPS_PROXY="http://p:1", REQUEST_METHOD="GET")
    ) == ProxyURL("http", "p", 1)


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("proxy.corp:3128", ProxyURL("http", "proxy.corp", 3128)),
        ("proxy.corp", ProxyURL("http", "proxy.corp", 80)),
        ("https://proxy.corp", ProxyURL("https", "proxy.corp", 443)),
        ("HTTP://user:p%40ss@proxy.corp:8080/", ProxyURL("http", "proxy.corp", 8080, "user", "p@ss")),
        ("socks5h://[::1]:1081", ProxyURL("socks5h", "::1", 1081)),
    ],
)
def test_proxy_urls(text: str, parsed: ProxyURL) -> None:
    assert parse_proxy_url(text) == parsed


@pytest.mark.parametrize(
    "text, message",
    [
        ("ftp://proxy.corp:21", "unsupported proxy scheme 'ftp'"),
        ("socks4://proxy.corp", "unsupported proxy scheme 'socks4'"),
        ("http://proxy.corp:99999", "invalid proxy URL"),
        ("http://proxy.corp:abc", "invalid proxy URL"),
        ("http://[::1:3128", "invalid proxy URL"),
    ],
)
def test_unusable_proxy_urls_name_their_source(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        parse_proxy_url(text, "HTTPS_PROXY")
    assert str(raised.value).startswith("HTTPS_PROXY: ")
    assert isinstance(raised.value, ValueError)


def test_the_password_stays_out_of_messages() -> None:
    proxy = parse_proxy_url("http://agent:hunter2@proxy.corp:3128")
    assert str(proxy) == "http://agent:***@proxy.corp:3128"


# ------------------------------------------------------------ through a real proxy
@pytest.fixture
def upper_echo() -> Iterator[int]:
    """A loopback server that answers each connection's first bytes in upper case."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                conn.sendall(conn.recv(1024).upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept; close alone does not
    listener.close()
    thread.join(TIMEOUT)


def round_trip(proxy: str, port: int, host: str = "127.0.0.1") -> bytes:
    with connect_through_proxy(parse_proxy_url(proxy), host, port, TIMEOUT) as sock:
        sock.sendall(b"through")
        return sock.recv(1024)


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks5h"])
def test_through_a_proxy_with_credentials(upper_echo: int, scheme: str) -> None:
    with ConnectProxy(credentials=("agent", "s3cret:/@"), names={"server.internal": "127.0.0.1"}) as proxy:
        url = f"{scheme}://agent:s3cret%3A%2F%40@127.0.0.1:{proxy.port}"
        # the name is resolved by the proxy: this host could not resolve it
        assert round_trip(url, upper_echo, "server.internal") == b"THROUGH"
        assert proxy.tunnels == [f"server.internal:{upper_echo}"]


@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_wrong_or_missing_credentials(upper_echo: int, scheme: str) -> None:
    with ConnectProxy(credentials=("agent", "right")) as proxy:
        with pytest.raises(ProxyError) as wrong:
            round_trip(f"{scheme}://agent:wrong@127.0.0.1:{proxy.port}", upper_echo)
        with pytest.raises(ProxyError) as missing:
            round_trip(f"{scheme}://127.0.0.1:{proxy.port}", upper_echo)
        assert proxy.tunnels == []
    assert "wrong" not in str(wrong.value)
    if scheme == "http":
        assert wrong.value.status == 407 and "rejected the credentials" in str(wrong.value)
        assert missing.value.status == 407 and "wants credentials" in str(missing.value)
    else:
        assert "authentication failure" in str(wrong.value)
        assert "authentication" in str(missing.value)


@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_a_refusing_proxy(upper_echo: int, scheme: str) -> None:
    with ConnectProxy(refuse=True) as proxy:
        with pytest.raises(ProxyError) as refused:
            round_trip(f"{scheme}://127.0.0.1:{proxy.port}", upper_echo)
        assert proxy.refusals == [f"policy for 127.0.0.1:{upper_echo}"]
    assert "refused" in str(refused.value)
    if scheme == "http":
        assert refused.value.status == 403


def test_socks5_needs_no_extra_package(upper_echo: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent speaks SOCKS5 itself (RFC 1928/1929): with ``python-socks``
    unimportable, names, IP literals, credentials and a refusal's
    reply code all work (the code before this took python-socks, and its
    proxy URL was refused at parse time without it)."""
    monkeypatch.setitem(sys.modules, "python_socks", None)
    monkeypatch.setitem(sys.modules, "python_socks.sync", None)
    with ConnectProxy(credentials=("agent", "pw"), names={"server.internal": "127.0.0.1"}) as proxy:
        for host in ("server.internal", "127.0.0.1"):
            assert round_trip(f"socks5://agent:pw@127.0.0.1:{proxy.port}", upper_echo, host) == b"THROUGH"
        assert proxy.tunnels == [f"server.internal:{upper_echo}", f"127.0.0.1:{upper_echo}"]
    with ConnectProxy(refuse=True) as proxy:
        with pytest.raises(ProxyError, match="refused 127.0.0.1:.*connection not allowed by ruleset"):
            round_trip(f"socks5h://127.0.0.1:{proxy.port}", upper_echo)


def test_no_proxy_listening() -> None:
    spare = socket.create_server(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()
    with pytest.raises(ProxyError, match=f"cannot reach proxy http://127.0.0.1:{port}"):
        round_trip(f"http://127.0.0.1:{port}", 80)


def test_a_tls_proxy(upper_echo: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``https://`` proxies: TLS to the proxy, verified against the default
    store (here one holding only a test CA), then CONNECT inside it."""
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with ConnectProxy(credentials=("agent", "pw"), tls=context) as proxy:
        assert round_trip(f"https://agent:pw@localhost:{proxy.port}", upper_echo) == b"THROUGH"
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
        with pytest.raises(ProxyError, match="CERTIFICATE_VERIFY_FAILED"):
            round_trip(f"https://agent:pw@localhost:{proxy.port}", upper_echo)
        assert len(proxy.tunnels) == 1
