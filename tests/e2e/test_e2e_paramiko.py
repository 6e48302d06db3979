"""paramiko (SSH, SFTP) over a connection dialed through a real tunnel.

The SSH server is paramiko's own (``ServerInterface`` and ``SFTPServer``)
on a loopback port on the agent's side; the server side dials it through the
tunnel and hands the connection to ``SSHClient.connect(sock=...)``, as a user
reaching an agent's sshd would.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import paramiko
import pytest

from remotedialer.errors import TunnelClosedError

from testkit.support import TIMEOUT, LoopbackListener, TunnelServer, wait_for

USER, PASSWORD = "tunnel", "through"


class _SSHServer(paramiko.ServerInterface):
    """Password auth, session channels, ``exec`` echoing the command and a line back."""

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        if (username, password) == (USER, PASSWORD):
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: Any, command: bytes) -> bool:
        def reply() -> None:
            # Reads first: the client writes only once the request was
            # granted, so the reply cannot overtake paramiko's "request ok".
            line = channel.recv(1024)
            channel.sendall(b"ran " + command + b": " + line)
            channel.send_exit_status(0)
            channel.close()

        threading.Thread(target=reply, daemon=True).start()
        return True


class _Handle(paramiko.SFTPHandle):
    def stat(self) -> Any:
        return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))


class _DirectorySFTP(paramiko.SFTPServerInterface):
    """Files of one directory (just open and stat: what get/put use)."""

    def __init__(self, server: Any, root: str) -> None:
        super().__init__(server)
        self.root = root

    def _real(self, path: str) -> str:
        return os.path.join(self.root, os.path.basename(path))

    def open(self, path: str, flags: int, attr: Any) -> Any:
        try:
            fd = os.open(self._real(path), flags | getattr(os, "O_BINARY", 0), 0o600)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)
        writing = flags & (os.O_WRONLY | os.O_RDWR)
        handle = _Handle(flags)
        handle.readfile = handle.writefile = os.fdopen(fd, "r+b" if writing else "rb")
        return handle

    def stat(self, path: str) -> Any:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self._real(path)))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    lstat = stat


class _SFTPServer(paramiko.SFTPServer):
    """paramiko's SFTPServer, remembering its threads so the test can join them."""

    started: List[threading.Thread] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started.append(self)


class SSHServer(LoopbackListener):
    """paramiko's server side on a loopback port: one Transport per connection."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.host_key = paramiko.ECDSAKey.generate()
        self.transports: List[paramiko.Transport] = []
        super().__init__(name="test-sshd")

    def handle(self, sock: socket.socket) -> None:
        transport = paramiko.Transport(sock)
        transport.add_server_key(self.host_key)
        transport.set_subsystem_handler("sftp", _SFTPServer, _DirectorySFTP, self.root)
        self.transports.append(transport)
        transport.start_server(server=_SSHServer())

    def close(self) -> None:
        super().close()
        for transport in self.transports:
            transport.close()
            transport.join(TIMEOUT)
            assert not transport.is_alive(), "an SSH server thread did not end"
        while _SFTPServer.started:
            thread = _SFTPServer.started.pop()
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "an SFTP server thread did not end"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SSHServer]:
    server = SSHServer(tmp_path)
    yield server
    server.close()


@pytest.fixture
def thread_errors() -> Iterator[List[Tuple[Any, BaseException]]]:
    """``(thread, exception)`` for exceptions that escape any thread."""
    caught: List[Tuple[Any, BaseException]] = []
    previous = threading.excepthook

    def hook(args: Any) -> None:
        caught.append((args.thread, args.exc_value))

    threading.excepthook = hook
    yield caught
    threading.excepthook = previous


def ssh_through(tunnel_server: TunnelServer, sshd: SSHServer) -> paramiko.SSHClient:
    conn = tunnel_server.server.dial("foo", "tcp", sshd.address, timeout=TIMEOUT)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        "127.0.0.1", username=USER, password=PASSWORD, sock=conn,  # type: ignore[arg-type]
        timeout=TIMEOUT, banner_timeout=TIMEOUT, auth_timeout=TIMEOUT,
        allow_agent=False, look_for_keys=False,
    )
    return client


def close_ssh(client: paramiko.SSHClient) -> None:
    """Close the client and wait for its transport thread to end."""
    transport = client.get_transport()
    client.close()
    if transport is not None:
        transport.join(TIMEOUT)
        assert not transport.is_alive(), "paramiko's transport thread did not end"


def test_exec_and_sftp_round_trip(tunnel_server: TunnelServer, sshd: SSHServer, tmp_path: Path) -> None:
    tunnel_server.client("foo")
    client = ssh_through(tunnel_server, sshd)
    try:
        stdin, stdout, _stderr = client.exec_command("uname -a", timeout=TIMEOUT)
        stdin.write(b"hello\n")
        stdin.flush()
        assert stdout.read() == b"ran uname -a: hello\n"
        assert stdout.channel.recv_exit_status() == 0

        data = os.urandom(3 * 1024 * 1024 + 17)
        (tmp_path / "up.bin").unlink(missing_ok=True)
        local = tmp_path / "local.bin"
        local.write_bytes(data)
        sftp = client.open_sftp()
        sftp.put(str(local), "up.bin")
        assert (tmp_path / "up.bin").read_bytes() == data
        back = tmp_path / "back.bin"
        sftp.get("up.bin", str(back))
        assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
        sftp.close()
    finally:
        close_ssh(client)


def test_agent_going_away_mid_download(
    tunnel_server: TunnelServer, sshd: SSHServer, tmp_path: Path,
    thread_errors: List[Tuple[Any, BaseException]], caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent stops while an SFTP download runs. paramiko's transport
    thread formats the socket error from ``args[1]`` and ``args[0]``: it must
    not crash on it, and it keeps the tunnel's error for the caller."""
    agent = tunnel_server.client("foo")
    (tmp_path / "big.bin").write_bytes(os.urandom(16 * 1024 * 1024))
    client = ssh_through(tunnel_server, sshd)
    transport = client.get_transport()
    assert transport is not None
    sftp = client.open_sftp()
    stopped = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= 1024 * 1024 and not stopped.is_set():
            stopped.set()
            agent.stop(TIMEOUT)  # the agent goes away mid-transfer

    try:
        with caplog.at_level("ERROR", logger="paramiko"), open(tmp_path / "part.bin", "wb") as sink:
            # paramiko's SFTP reports any lost connection (a plain TCP reset
            # too) as SSHException("Server connection dropped: "), or, when
            # its channel is closed before the next request goes out, as
            # OSError("Socket is closed"): which one is a race inside paramiko.
            with pytest.raises((paramiko.SSHException, OSError)) as lost:
                sftp.getfo("big.bin", sink, callback=progress)
            assert re.search("Server connection dropped|Socket is closed", str(lost.value)), lost.value
            transport.join(TIMEOUT)
            assert not transport.is_alive()
    finally:
        close_ssh(client)
        # paramiko's SFTP prefetch thread ends on its own: wait for it, so
        # that whatever it raises is seen here and not after the test.
        wait_for(lambda: not any("_prefetch_thread" in t.name for t in threading.enumerate()))
    assert stopped.is_set()
    crashed = [exc for thread, exc in thread_errors if isinstance(thread, paramiko.Transport)]
    assert crashed == [], f"paramiko's transport thread crashed: {crashed!r}"
    # Any other escape is paramiko's SFTP prefetch thread, which lets the
    # EOFError of a failed write out on every lost connection, TCP included.
    others = [exc for thread, exc in thread_errors if not isinstance(exc, EOFError)]
    assert others == [], f"exception in a thread: {others!r}"
    # The clear error: what the caller gets from transport.get_exception()
    # (and from any later channel call), and paramiko's log line.
    error = transport.get_exception()
    assert isinstance(error, TunnelClosedError) and isinstance(error, ConnectionResetError), repr(error)
    assert error.args == (errno.ECONNRESET, error.strerror)
    assert "tunnel disconnect" in error.strerror or "session ended" in error.strerror
    logged = [r.getMessage() for r in caplog.records if "Socket exception" in r.getMessage()]
    # (the SSH server's own transport, on the agent's side, may log its reset too)
    assert f"Socket exception: {error.strerror} ({errno.ECONNRESET})" in logged, logged


def test_ssh_session_carries_on_across_resets(sshd: SSHServer, tmp_path: Path) -> None:
    """With resumption (docs/protocol.rst) on both sides and a proxy that
    resets the tunnel's TCP connection: an SFTP upload and download and a
    command, each with a reset under it, in one SSH session."""
    from remotedialer.client import Backoff, TunnelClient
    from remotedialer.config import Limits

    from testkit.cut_proxy import CutProxy
    from testkit.support import allow_all

    limits = Limits(resume_window=30.0, ping_interval=0.5)
    tunnel = TunnelServer(limits=limits)
    proxy = CutProxy(("127.0.0.1", tunnel.port))
    agent = TunnelClient(f"ws://127.0.0.1:{proxy.port}/connect", {"X-Tunnel-ID": "foo"}, allow_all,
                         limits=limits, backoff=Backoff(initial=0.05, maximum=0.2))
    agent.start()
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        agent.wait_connected(TIMEOUT)
        wait_for(lambda: tunnel.server.has_session("foo"))
        client.connect(
            "127.0.0.1", username=USER, password=PASSWORD,
            sock=tunnel.server.dial("foo", "tcp", sshd.address, timeout=TIMEOUT),  # type: ignore[arg-type]
            timeout=TIMEOUT, banner_timeout=TIMEOUT, auth_timeout=TIMEOUT,
            allow_agent=False, look_for_keys=False,
        )
        data = hashlib.sha256(b"ssh").digest() * (128 * 1024)  # 4 MiB
        local = tmp_path / "local.bin"
        local.write_bytes(data)
        resets: List[int] = []

        def reset_once_halfway(done: int, total: int) -> None:
            if not resets and done >= total // 2:
                resets.append(done)
                proxy.reset()

        sftp = client.open_sftp()
        sftp.put(str(local), "up.bin", callback=reset_once_halfway)
        assert (tmp_path / "up.bin").read_bytes() == data
        resets.clear()
        sftp.get("up.bin", str(tmp_path / "back.bin"), callback=reset_once_halfway)
        assert (tmp_path / "back.bin").read_bytes() == data
        sftp.close()
        proxy.reset()
        stdin, stdout, _stderr = client.exec_command("uptime", timeout=TIMEOUT)
        stdin.write(b"still here\n")
        stdin.flush()
        assert stdout.read() == b"ran uptime: still here\n"
        assert proxy.accepted >= 3  # a new WebSocket after each reset that hit one
    finally:
        close_ssh(client)
        agent.stop(TIMEOUT)
        proxy.close()
        tunnel.close()
