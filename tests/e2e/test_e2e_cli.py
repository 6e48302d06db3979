"""End to end: the real ``remotedialer`` CLI processes on loopback.

``remotedialer server``, ``client`` and ``dummy`` run as separate processes
(each on a port the OS picked); requests go through
``/client/foo/http/127.0.0.1:PORT/...`` and every body is checked with
sha256. Also: the gunicorn app factory, ``remotedialer demo``, the ``bin/``
wrappers, tracing, and clean shutdown on SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from remotedialer.examples.file_server import generated_sha256
from testkit.cli import LISTENING, REPO, CliStack, Proc, cli_env, http_session, refused_port, wait_tunnel
from testkit.support import TIMEOUT

SMALL = b"hello through the tunnel\n"
BIG_SIZE = 6 * 1024 * 1024 + 123


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("served")
    (directory / "small.txt").write_bytes(SMALL)
    (directory / "big.bin").write_bytes(os.urandom(BIG_SIZE))
    return directory


@pytest.fixture(scope="module")
def cli(files: Path) -> Iterator[CliStack]:
    stack = CliStack(files)
    yield stack
    codes = stack.close()
    assert codes == [0, 0, 0], "a process did not exit cleanly on SIGTERM"


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_small_file(cli: CliStack, files: Path) -> None:
    response = cli.http.get(cli.url("/small.txt"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == _sha256_file(files / "small.txt")


def test_multi_mib_file(cli: CliStack, files: Path) -> None:
    digest = hashlib.sha256()
    size = 0
    with cli.http.get(cli.url("/big.bin"), stream=True, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(BIG_SIZE)
        for chunk in response.iter_content(1 << 16):
            digest.update(chunk)
            size += len(chunk)
    assert size == BIG_SIZE
    assert digest.hexdigest() == _sha256_file(files / "big.bin")


def test_generated_bytes(cli: CliStack) -> None:
    size = 20 * 1024 * 1024 + 1
    response = cli.http.get(cli.url(f"/bytes/{size}"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == generated_sha256(size)


def test_unknown_client_is_500(cli: CliStack) -> None:
    response = cli.http.get(cli.url("/small.txt", client="bar"), timeout=TIMEOUT)
    assert response.status_code == 500
    assert response.text == "failed to find Session for client bar"


def test_refused_target_is_500(cli: CliStack) -> None:
    response = cli.http.get(cli.url("/", port=refused_port()), timeout=TIMEOUT)
    assert response.status_code == 500
    assert "refused" in response.text.lower()


def test_idle_timeout_does_not_cut_a_flowing_download(cli: CliStack) -> None:
    """About 1.6 s of download with ?timeout=1: never idle for 1 s, so it completes."""
    started = time.monotonic()
    response = cli.http.get(cli.url("/drip/4000?interval=0.4&chunks=5&timeout=1"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == generated_sha256(4000)
    assert time.monotonic() - started > 1.0  # it did outlast the timeout


def test_idle_timeout_cuts_a_stall(cli: CliStack) -> None:
    with pytest.raises(requests.exceptions.RequestException):
        response = cli.http.get(cli.url("/stall?seconds=5&timeout=0.5"), timeout=TIMEOUT)
        response.raise_for_status()


def test_not_found_route(cli: CliStack) -> None:
    response = cli.http.get(f"http://127.0.0.1:{cli.server_port}/nothing", timeout=TIMEOUT)
    assert response.status_code == 404


def test_connect_without_tunnel_id_is_401(cli: CliStack) -> None:
    response = cli.http.get(
        f"http://127.0.0.1:{cli.server_port}/connect",
        headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
        timeout=TIMEOUT,
    )
    assert response.status_code == 401
    assert response.text.strip() == "failed authentication"


def test_trace_logging_with_cattle_tunnel_data_debug(files: Path) -> None:
    """CATTLE_TUNNEL_DATA_DEBUG=true logs every message, as in Go."""
    dummy = Proc.cli("dummy", "--listen", "127.0.0.1:0", str(files))
    server = Proc.cli("server", "--listen", "127.0.0.1:0")
    procs = [dummy, server]
    try:
        dummy_port = int(dummy.wait_for(LISTENING).group(1))
        server_port = int(server.wait_for(LISTENING).group(1))
        client = Proc.cli("client", "--connect", f"ws://127.0.0.1:{server_port}/connect", "--id", "traced",
                          env=cli_env(CATTLE_TUNNEL_DATA_DEBUG="true"))
        procs.append(client)
        with http_session() as http:
            wait_tunnel(http, f"http://127.0.0.1:{server_port}/client/traced/http/127.0.0.1:{dummy_port}"
                               "/small.txt")
        client.wait_for(re.compile(r"remotedialer\.trace: .*recv .*CONNECT"))
        client.wait_for(re.compile(r"remotedialer\.trace: .*send .*DATA"))
        assert "remotedialer.trace" not in server.output  # only where asked for
    finally:
        codes = [proc.stop() for proc in reversed(procs)]
    assert codes == [0] * len(procs)


def test_client_keeps_retrying_until_the_server_appears(files: Path) -> None:
    """A client started before any server retries with backoff and exits
    cleanly on SIGTERM while waiting."""
    client = Proc.cli("client", "--connect", f"ws://127.0.0.1:{refused_port()}/connect")
    try:
        client.wait_for(re.compile(r"failed to connect"))
        client.wait_for(re.compile(r"reconnecting to .* in [0-9.]+s"))
    finally:
        assert client.stop() == 0


def test_bad_arguments_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "remotedialer.cli", "server", "--listen", "nonsense"],
        capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(),
    )
    assert result.returncode == 2
    assert "invalid listen address" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "remotedialer.cli", "client", "--connect", "http://x"],
        capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(),
    )
    assert result.returncode == 2


def test_demo_exits_0() -> None:
    # The console script of the environment under test (not one elsewhere on PATH).
    script = Path(sys.executable).parent / "remotedialer"
    args = [str(script)] if script.exists() else [sys.executable, "-m", "remotedialer.cli"]
    result = subprocess.run(
        [*args, "demo", "--size", "8"], capture_output=True, text=True, timeout=120, env=cli_env(), cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 5 checks passed" in result.stdout
    assert "sha256 ok" in result.stdout
    assert "MiB/s" in result.stdout


@pytest.mark.parametrize("name", ["server", "client", "dummy", "demo"])
def test_bin_wrappers(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bin" / f"remotedialer-{name}"), "--help"],
        capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(),
    )
    assert result.returncode == 0, result.stderr
    assert f"usage: remotedialer {name}" in result.stdout


def test_gunicorn_app_factory(files: Path) -> None:
    """``gunicorn -k gthread 'remotedialer.cli.server:make_app()'`` serves the
    same routes, with the CLI client connected to it."""
    config = pytest.importorskip("gunicorn.config")
    extra = []
    if any(setting.name == "control_socket_disable" for setting in config.KNOWN_SETTINGS):
        extra.append("--no-control-socket")  # gunicorn 27+: no shared socket in $HOME
    dummy = Proc.cli("dummy", "--listen", "127.0.0.1:0", str(files))
    gunicorn = Proc([
        sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "16", "-w", "1", *extra,
        "-b", "127.0.0.1:0", "--graceful-timeout", "2", "remotedialer.cli.server:make_app()",
    ])
    procs = [dummy, gunicorn]
    try:
        dummy_port = int(dummy.wait_for(LISTENING).group(1))
        port = int(gunicorn.wait_for(re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")).group(1))
        client = Proc.cli("client", "--connect", f"ws://127.0.0.1:{port}/connect", "--id", "g")
        procs.append(client)
        base = f"http://127.0.0.1:{port}/client/g/http/127.0.0.1:{dummy_port}"
        with http_session() as http:
            wait_tunnel(http, f"{base}/small.txt")
            response = http.get(f"{base}/big.bin", timeout=TIMEOUT)
            assert response.status_code == 200
            assert hashlib.sha256(response.content).hexdigest() == _sha256_file(files / "big.bin")
            drip = http.get(f"{base}/drip/3000?interval=0.3&chunks=4&timeout=0.8", timeout=TIMEOUT)
            assert hashlib.sha256(drip.content).hexdigest() == generated_sha256(3000)
            missing = http.get(base.replace("/g/", "/nobody/") + "/small.txt", timeout=TIMEOUT)
            assert missing.status_code == 500
    finally:
        codes = [proc.stop() for proc in reversed(procs)]
    assert codes[-1] == 0  # the dummy server
