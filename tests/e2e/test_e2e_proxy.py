"""The agent reaching its server through a forward proxy, end to end: a real
tunnel server, a real client (in process and the CLI as a process) and the
loopback proxy of :mod:`testkit.connect_proxy` (HTTP CONNECT and SOCKS5, may
want credentials, may refuse)."""

from __future__ import annotations

import logging
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import trustme

from remotedialer.client import Backoff, TunnelClient
from remotedialer.errors import ProxyError
from testkit.connect_proxy import ConnectProxy
from testkit.support import TIMEOUT, EchoServer, TunnelServer, allow_all, wait_for

REPO = Path(__file__).resolve().parents[2]
FAST = Backoff(initial=0.05, maximum=0.1)
PROXY = r"proxy http://agent:\*\*\*@127\.0\.0\.1:\d+"  # as logs show it: no password


@pytest.fixture
def proxies() -> Iterator[Callable[..., ConnectProxy]]:
    made: List[ConnectProxy] = []

    def make(**options: object) -> ConnectProxy:
        made.append(ConnectProxy(**options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for proxy in made:
        proxy.stop()


def echo_through(server: TunnelServer, key: str, echo: EchoServer) -> bytes:
    conn = server.server.dial(key, "tcp", f"127.0.0.1:{echo.port}", TIMEOUT)
    with conn:
        conn.sendall(b"ping through the proxy")
        data = b""
        while len(data) < len(b"ping through the proxy"):
            chunk = conn.recv(1024)
            assert chunk
            data += chunk
    return data


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks5h"])
def test_tunnel_through_a_proxy_with_credentials(
    tunnel_server: TunnelServer, echo_server: EchoServer, proxies: Callable[..., ConnectProxy], scheme: str
) -> None:
    proxy = proxies(credentials=("agent", "pa:ss"))
    tunnel_server.client("via-proxy", proxy=f"{scheme}://agent:pa%3Ass@127.0.0.1:{proxy.port}")
    assert echo_through(tunnel_server, "via-proxy", echo_server) == b"ping through the proxy"
    assert proxy.tunnels == [f"127.0.0.1:{tunnel_server.port}"]


def test_wss_through_an_http_proxy(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer,
    proxies: Callable[..., ConnectProxy],
) -> None:
    """TLS runs end to end between the agent and the server, inside the CONNECT tunnel."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = make_tunnel_server(ssl_context=server_context)
    proxy = proxies()
    server.client("secure", proxy=proxy.url, ssl_context=client_context)
    assert echo_through(server, "secure", echo_server) == b"ping through the proxy"
    assert proxy.tunnels == [f"127.0.0.1:{server.port}"]


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"credentials": ("agent", "right")}, PROXY + r" rejected the credentials"),
        ({"refuse": True}, PROXY + r" refused CONNECT 127\.0\.0\.1:\d+: HTTP 403"),
    ],
    ids=["wrong-credentials", "refusing"],
)
def test_a_proxy_saying_no_is_a_log_line_and_a_backoff(
    tunnel_server: TunnelServer, proxies: Callable[..., ConnectProxy], caplog: pytest.LogCaptureFixture,
    options: dict, expected: str,
) -> None:
    proxy = proxies(**options)
    caplog.set_level(logging.WARNING, logger="remotedialer.client")
    client = TunnelClient(tunnel_server.url, {"X-Tunnel-ID": "refused"}, allow_all, backoff=FAST,
                          proxy=f"http://agent:wrong@127.0.0.1:{proxy.port}")
    thread = client.start()
    try:
        proxy.wait(refusals=3)
        wait_for(lambda: len(caplog.records) >= 3)
        assert thread.is_alive()  # still trying, as it should
    finally:
        client.stop(TIMEOUT)
    assert isinstance(client.last_error, ProxyError)
    assert not thread.is_alive()
    for record in caplog.records[:3]:
        line = record.getMessage()
        assert "\n" not in line and "wrong" not in line
        assert re.fullmatch(rf"failed to connect to {re.escape(tunnel_server.url)}: {expected}.*", line), line
    assert proxy.tunnels == [] and not tunnel_server.server.sessions("refused")


# ------------------------------------------------------------ the CLI
def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_agent(args: List[str], env: dict) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        [sys.executable, "-m", "remotedialer.cli", "client", *args], env=env, cwd=str(REPO),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def stop_agent(agent: "subprocess.Popen[str]") -> str:
    agent.terminate()
    _, stderr = agent.communicate(timeout=TIMEOUT)
    assert agent.returncode == 0, stderr
    return stderr


def test_cli_agent_uses_http_proxy_from_the_environment(
    tunnel_server: TunnelServer, echo_server: EchoServer, proxies: Callable[..., ConnectProxy]
) -> None:
    """``HTTP_PROXY`` for a ``ws://`` server, as a Go agent reads it. The
    server's name is one only the proxy can resolve: the agent never looks it up."""
    proxy = proxies(names={"tunnel.test": "127.0.0.1"})
    agent = run_agent(["--connect", f"ws://tunnel.test:{tunnel_server.port}/connect", "--id", "env-agent"],
                      cli_env(HTTP_PROXY=proxy.url, NO_PROXY="other.test,10.0.0.0/8"))
    try:
        wait_for(lambda: tunnel_server.server.sessions("env-agent") or agent.poll() is not None)
        assert echo_through(tunnel_server, "env-agent", echo_server) == b"ping through the proxy"
    finally:
        stop_agent(agent)
    assert proxy.tunnels == [f"tunnel.test:{tunnel_server.port}"]


def test_cli_agent_with_proxy_option(
    tunnel_server: TunnelServer, echo_server: EchoServer, proxies: Callable[..., ConnectProxy]
) -> None:
    """``--proxy`` applies to every server, loopback included, and wins over the environment."""
    proxy = proxies(credentials=("cli", "secret"))
    unused = proxies()
    agent = run_agent(
        ["--connect", tunnel_server.url, "--id", "flag-agent",
         "--proxy", f"http://cli:secret@127.0.0.1:{proxy.port}"],
        cli_env(HTTP_PROXY=unused.url),
    )
    try:
        wait_for(lambda: tunnel_server.server.sessions("flag-agent") or agent.poll() is not None)
        assert echo_through(tunnel_server, "flag-agent", echo_server) == b"ping through the proxy"
    finally:
        stderr = stop_agent(agent)
    assert proxy.tunnels == [f"127.0.0.1:{tunnel_server.port}"] and unused.tunnels == []
    assert "secret" not in stderr
