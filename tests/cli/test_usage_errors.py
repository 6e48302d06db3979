"""Every ``remotedialer`` command, run as a real process with bad input: one
line on stderr, no traceback, exit status 2 for a usage error and 1 for a
runtime one (a port in use), and promptly (an agent that cannot ever connect
must not stay up looking healthy)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0


def run_cli(*args: str, env_extra: "dict[str, str] | None" = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    try:
        return subprocess.run(
            [sys.executable, "-m", "remotedialer.cli", *args], capture_output=True, text=True,
            env=env, cwd=str(REPO), timeout=TIMEOUT, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"remotedialer {' '.join(args)} still running after {TIMEOUT}s: "
                             f"{exc.stderr!r}") from None


def assert_one_line(result: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    lines: List[str] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, (result.returncode, result.stderr)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A loopback port some other program listens on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


@pytest.fixture(scope="module")
def not_pem(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("certs") / "not-a-certificate.pem"
    path.write_text("this is not a certificate\n")
    return str(path)


@pytest.mark.parametrize(
    "url, needle",
    [
        ("ws://127.0.0.1:99999/connect", "port"),
        ("ws://127.0.0.1:abc/connect", "port"),
        ("ws://127.0.0.1:-1/connect", "port"),
        ("ws://[::1/connect", "IPv6"),
        ("http://127.0.0.1:8123/connect", "ws://"),
        ("ws:///connect", "host"),
        ("127.0.0.1:8123", "ws://"),
    ],
)
def test_client_with_an_unusable_server_url(url: str, needle: str) -> None:
    line = assert_one_line(run_cli("client", "--connect", url, "--id", "x"), 2, "--connect", needle)
    assert url in line


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_client_with_a_missing_ca_file(scheme: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing-ca.pem")
    assert_one_line(
        run_cli("client", "--connect", f"{scheme}://127.0.0.1:8123/connect", "--cacert", missing),
        2, "--cacert", missing,
    )


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_client_with_a_ca_file_that_is_not_pem(scheme: str, not_pem: str) -> None:
    assert_one_line(
        run_cli("client", "--connect", f"{scheme}://127.0.0.1:8123/connect", "--cacert", not_pem),
        2, "--cacert", not_pem,
    )


@pytest.mark.parametrize(
    "proxy, needle",
    [
        ("ftp://proxy.corp:21", "unsupported proxy scheme"),
        ("http://proxy.corp:99999", "invalid proxy URL"),
        ("http://[::1:3128", "invalid proxy URL"),
    ],
)
def test_client_with_an_unusable_proxy(proxy: str, needle: str) -> None:
    assert_one_line(run_cli("client", "--connect", "ws://127.0.0.1:8123/connect", "--proxy", proxy),
                    2, "--proxy", needle)


def test_client_with_an_unusable_proxy_variable() -> None:
    result = run_cli("client", "--connect", "wss://tunnel.example:8443/connect",
                     env_extra={"HTTPS_PROXY": "ftp://proxy.corp"})
    assert_one_line(result, 2, "HTTPS_PROXY", "unsupported proxy scheme")


@pytest.mark.parametrize(
    "args",
    [
        ["client", "--no-such-option"],
        ["server", "--listen", "127.0.0.1:99999"],
        ["server", "--listen", "[::1"],
        ["server", "--timeout", "abc"],
        ["server", "--forward", "bad"],
        ["server", "--peers", "bad"],
        ["server", "--listen", "127.0.0.1:0", "--peers", "a:token:ws://127.0.0.1:1/connect"],
        ["server", "--max-threads", "-1"],
        ["server", "--keepalive", "-5"],
        ["server", "--timeout", "nan"],
        ["server", "--drain-seconds", "-1"],
        ["server", "--forward", "127.0.0.1:99999=foo:tcp:127.0.0.1:1"],
        ["client", "--connect"],
        ["bench", "--no-such-option"],
        ["dummy", "--listen", "127.0.0.1:99999"],
        ["dummy", "/nonexistent-directory"],
        ["demo", "--size", "abc"],
        ["demo", "--size", "0"],
        ["no-such-command"],
        [],
    ],
    ids=lambda args: " ".join(args) or "no-command",
)
def test_usage_errors_are_one_line(args: List[str]) -> None:
    assert_one_line(run_cli(*args), 2)


@pytest.mark.parametrize("command", ["server", "dummy"])
def test_a_port_in_use_is_one_line(command: str, busy_port: int) -> None:
    assert_one_line(run_cli(command, "--listen", f"127.0.0.1:{busy_port}"), 1, str(busy_port), "in use")
