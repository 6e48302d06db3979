"""End to end: a locked-down ``remotedialer server`` process with a
credentials file, real ``remotedialer client`` agents, users through
``/client/``, the ``remotedialer admin`` command, reloads on SIGHUP and on
a file change, and a reload while hundreds of agents are connected and
requests are flowing.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
import requests

from remotedialer.client import Backoff, TunnelClient
from remotedialer.server.credentials import hash_secret, new_secret

from testkit.cli import LISTENING, REPO, Proc, cli_env, http_session
from testkit.support import TIMEOUT, allow_all, wait_for

BODY = b"behind the agent\n"
RELOADS = re.compile(r"credentials reloaded|credentials not reloaded")


class Target:
    """A real HTTP server on loopback: the service behind the agents."""

    def __init__(self, directory: Path) -> None:
        (directory / "index.txt").write_bytes(BODY)
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class Secrets:
    def __init__(self) -> None:
        self.edge, self.db, self.alice, self.ops = (new_secret() for _ in range(4))


def credentials_text(s: Secrets, target_port: int, extra: str = "") -> str:
    return (
        f"agent {hash_secret(s.edge)} edge-*\n"
        f"agent {hash_secret(s.db)} db-1\n"
        f"user alice {hash_secret(s.alice)} edge-*\n"
        f"user ops {hash_secret(s.ops)} * admin\n"
        f"policy edge-* allow=127.0.0.1:{target_port} max-connections=50\n"
        f"policy db-1 allow=127.0.0.1:{target_port}\n" + extra
    )


class Locked:
    """The server process, the target, the secrets, and helpers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.secrets = Secrets()
        self.target = Target(tmp)
        self.creds = tmp / "credentials"
        self.creds.write_text(credentials_text(self.secrets, self.target.port))
        self.procs: List[Proc] = []
        self.server = self.start("server", "--listen", "127.0.0.1:0", "--credentials", str(self.creds))
        self.port = int(self.server.wait_for(LISTENING).group(1))
        self.http = http_session()

    def start(self, *args: str, env: Optional[Dict[str, str]] = None) -> Proc:
        proc = Proc.cli(*args, env=env)
        self.procs.append(proc)
        return proc

    def secret_file(self, name: str, secret: str) -> str:
        path = self.tmp / f"{name}.secret"
        path.write_text(secret + "\n")
        path.chmod(0o600)
        return str(path)

    def agent(self, key: str, secret: str, via_env: bool = False) -> Proc:
        args = ["client", "--connect", f"ws://127.0.0.1:{self.port}/connect", "--id", key]
        if via_env:
            return self.start(*args, env=cli_env(REMOTEDIALER_TOKEN=secret))
        return self.start(*args, "--token-file", self.secret_file(key, secret))

    def url(self, key: str, path: str = "/index.txt", port: Optional[int] = None) -> str:
        return f"http://127.0.0.1:{self.port}/client/{key}/http/127.0.0.1:{port or self.target.port}{path}"

    def get(self, key: str, user_secret: Optional[str], **kwargs: object) -> requests.Response:
        auth = ("user", user_secret) if user_secret else None
        return self.http.get(self.url(key, **kwargs), auth=auth, timeout=TIMEOUT)  # type: ignore[arg-type]

    def wait_agent(self, key: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.get(key, self.secrets.ops if key == "db-1" else self.secrets.alice).status_code != 200:
            assert time.monotonic() < deadline, f"agent {key} not reachable:\n{self.server.output}"
            time.sleep(0.05)

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "remotedialer.cli", "admin", "--server", f"http://127.0.0.1:{self.port}",
             "--token-file", self.secret_file("ops", self.secrets.ops), *args],
            capture_output=True, text=True, env=cli_env(), cwd=str(REPO), timeout=TIMEOUT,
        )

    def close(self) -> List[int]:
        self.http.close()
        codes = [proc.stop() for proc in reversed(self.procs)]
        self.target.close()
        return codes


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Locked]:
    stack = Locked(tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def test_agents_users_policy_and_admin(locked: Locked) -> None:
    s = locked.secrets
    locked.server.wait_for(re.compile(r"credentials from .*: 2 agent secrets, 2 users \(1 admins\)"))
    assert "open server" not in locked.server.output
    locked.agent("edge-1", s.edge)
    locked.agent("db-1", s.db, via_env=True)
    locked.wait_agent("edge-1")
    # users (the db-1 check waits on ops, who reaches every agent)
    locked.wait_agent("db-1")
    assert locked.get("edge-1", s.alice).content == BODY
    assert locked.get("edge-1", None).status_code == 401
    assert locked.get("edge-1", new_secret()).status_code == 401
    assert locked.get("edge-1", s.edge).status_code == 401  # an agent secret is no user secret
    assert locked.get("db-1", s.alice).status_code == 403
    # the dial policy, through /client/
    refused = locked.get("edge-1", s.alice, port=1)
    assert refused.status_code == 403 and "not allowed" in refused.text
    locked.server.wait_for(re.compile(r"refused dial tcp/127\.0\.0\.1:1 through edge-1"))
    # agents with a wrong secret or one for another key
    locked.agent("edge-2", s.db)
    locked.agent("edge-3", new_secret(), via_env=True)
    locked.server.wait_for(re.compile(r"refused agent 'edge-2' from 127\.0\.0\.1:\d+: HTTP 403"))
    locked.server.wait_for(re.compile(r"refused agent 'edge-3' from 127\.0\.0\.1:\d+: HTTP 401: unknown"))
    for secret in (s.db, s.edge, s.alice, s.ops):
        assert secret not in locked.server.output
    # the admin command
    listing = locked.admin("list")
    assert listing.returncode == 0, listing.stderr
    keys = sorted(line.split("\t")[0] for line in listing.stdout.splitlines())
    assert keys == ["db-1", "edge-1"]
    shown = locked.admin("show", "edge-1")
    record = json.loads(shown.stdout)
    assert record["where"] == "local" and record["sessions"][0]["bytes_received"] > len(BODY)
    assert locked.admin("show", "nobody").returncode == 1
    gone = locked.admin("disconnect", "db-1")
    assert gone.returncode == 0 and json.loads(gone.stdout)["disconnected_sessions"] == 1
    locked.server.wait_for(re.compile(r"admin ops \(from 127\.0\.0\.1:\d+\) disconnected db-1: 1 sessions"))
    locked.server.wait_for(re.compile(r"client session for db-1 ended: .*disconnected by admin ops"))
    # metrics
    metrics = locked.http.get(f"http://127.0.0.1:{locked.port}/metrics", timeout=TIMEOUT).text
    assert re.search(r'remotedialer_refused_handshakes_total\{status="403"\} [1-9]', metrics)
    assert re.search(r'remotedialer_refused_dials_total\{clientkey="edge-1",reason="target"\} 1', metrics)


def test_admin_needs_the_admin_role(locked: Locked) -> None:
    base = f"http://127.0.0.1:{locked.port}/admin/agents"
    assert locked.http.get(base, timeout=TIMEOUT).status_code == 401
    headers = {"Authorization": f"Bearer {locked.secrets.alice}"}
    assert locked.http.get(base, headers=headers, timeout=TIMEOUT).status_code == 403
    env_run = subprocess.run(
        [sys.executable, "-m", "remotedialer.cli", "admin", "--server", f"http://127.0.0.1:{locked.port}",
         "list"],
        capture_output=True, text=True, env=cli_env(REMOTEDIALER_ADMIN_TOKEN=locked.secrets.alice),
        cwd=str(REPO), timeout=TIMEOUT,
    )
    assert env_run.returncode == 1 and "HTTP 403" in env_run.stderr


def test_reload_on_sighup_and_on_change_keeps_the_tunnel(locked: Locked) -> None:
    s = locked.secrets
    locked.agent("edge-1", s.edge)
    locked.wait_agent("edge-1")
    since = json.loads(locked.admin("show", "edge-1").stdout)["sessions"][0]["connected_since"]
    bob = new_secret()
    # 1. SIGHUP: a new user (the file's mtime is set back, so only the signal can tell)
    stat = locked.creds.stat()
    locked.creds.write_text(credentials_text(s, locked.target.port, f"user bob {hash_secret(bob)} edge-1\n"))
    os.utime(locked.creds, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    locked.server.popen.send_signal(signal.SIGHUP)
    locked.server.wait_for(re.compile(r"credentials reloaded from .*3 users"))
    assert locked.get("edge-1", bob).status_code == 200
    # 2. a bad file: the last good one stays
    locked.creds.write_text(credentials_text(s, locked.target.port, "user bob nonsense\n"))
    locked.server.wait_for(re.compile(r"credentials not reloaded, keeping the last good ones: .*:7: "))
    assert locked.get("edge-1", bob).status_code == 200
    # 3. a change of the file alone: bob is gone
    locked.creds.write_text(credentials_text(s, locked.target.port))
    locked.server.wait_for(re.compile(r"credentials reloaded from .*2 users"))
    assert locked.get("edge-1", bob).status_code == 401
    # the agent's tunnel was never dropped
    again = json.loads(locked.admin("show", "edge-1").stdout)["sessions"]
    assert len(again) == 1 and again[0]["connected_since"] == since
    assert "session for edge-1 ended" not in locked.server.output
    metrics = locked.http.get(f"http://127.0.0.1:{locked.port}/metrics", timeout=TIMEOUT).text
    assert 'remotedialer_credentials_reloads_total{result="ok"} 2' in metrics
    assert 'remotedialer_credentials_reloads_total{result="failed"} 1' in metrics


def test_malformed_file_at_start_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(f"# ok\nagent {hash_secret(new_secret())} a\npolicy a allow=10.0.0.0/99\n")
    result = subprocess.run(
        [sys.executable, "-m", "remotedialer.cli", "server", "--listen", "127.0.0.1:0",
         "--credentials", str(creds)],
        capture_output=True, text=True, env=cli_env(), cwd=str(REPO), timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert f"{creds}:3: bad network in target" in result.stderr


def test_secret_commands() -> None:
    made = subprocess.run([sys.executable, "-m", "remotedialer.cli", "server", "--new-secret"],
                          capture_output=True, text=True, env=cli_env(), cwd=str(REPO), timeout=TIMEOUT)
    assert made.returncode == 0
    secret = re.search(r"^secret: (\S+)", made.stdout, re.M).group(1)  # type: ignore[union-attr]
    digest = re.search(r"^hash: +(\S+)", made.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert digest == hash_secret(secret)
    hashed = subprocess.run([sys.executable, "-m", "remotedialer.cli", "server", "--hash-secret"],
                            input=secret + "\n", capture_output=True, text=True, env=cli_env(),
                            cwd=str(REPO), timeout=TIMEOUT)
    assert hashed.returncode == 0 and hashed.stdout.strip() == digest
    short = subprocess.run([sys.executable, "-m", "remotedialer.cli", "server", "--hash-secret"],
                           input="hunter2\n", capture_output=True, text=True, env=cli_env(),
                           cwd=str(REPO), timeout=TIMEOUT)
    assert short.returncode == 2 and "too short" in short.stderr


# ------------------------------------------------------ reload under load
def reload_under_load(tmp_path: Path, agents: int, reloads: int) -> None:
    """``agents`` in-process agents (each with its own secret) on a server
    process; requests flow through random agents while the file is
    rewritten and SIGHUP'd ``reloads`` times (one of them a bad file). No
    tunnel may drop and no request may fail."""
    target = Target(tmp_path)
    keys = [f"load-{n}" for n in range(agents)]
    secrets = {key: new_secret() for key in keys}
    user = new_secret()
    creds = tmp_path / "credentials"

    def write(generation: int, bad: bool = False) -> None:
        lines = [f"agent {hash_secret(secrets[key])} {key}" for key in keys]
        lines.append(f"user u{generation} {hash_secret(user)} load-*")
        lines.append(f"policy load-* allow=127.0.0.1:{target.port}")
        if bad:
            lines.append("policy")
        creds.write_text("\n".join(lines) + "\n")

    write(0)
    server = Proc.cli("server", "--listen", "127.0.0.1:0", "--credentials", str(creds))
    clients: List[TunnelClient] = []
    http = http_session()
    try:
        port = int(server.wait_for(LISTENING).group(1))
        for key in keys:
            client = TunnelClient(f"ws://127.0.0.1:{port}/connect",
                                  {"X-Tunnel-ID": key, "Authorization": f"Bearer {secrets[key]}"}, allow_all,
                                  backoff=Backoff(initial=0.1, maximum=1.0))
            clients.append(client)
            client.start()
        sessions = [client.wait_connected(TIMEOUT * 3) for client in clients]
        failures: List[str] = []
        done = threading.Event()
        served = [0]

        def load() -> None:
            with http_session() as h:
                while not done.is_set():
                    key = random.choice(keys)
                    url = f"http://127.0.0.1:{port}/client/{key}/http/127.0.0.1:{target.port}/index.txt"
                    r = h.get(url, auth=("u", user), timeout=TIMEOUT)
                    if r.status_code != 200 or r.content != BODY:
                        failures.append(f"{key}: {r.status_code} {r.text[:100]}")
                    served[0] += 1

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        wait_for(lambda: served[0] >= 20, TIMEOUT)
        for generation in range(1, reloads + 1):
            bad = generation == reloads // 2
            write(generation, bad)
            server.popen.send_signal(signal.SIGHUP)
            wait_for(functools.partial(_seen, server, RELOADS, generation), TIMEOUT)
        assert len(re.findall(r"keeping the last good ones", server.output)) == 1
        assert len(re.findall(rf"reloaded from .*: {agents} agent secrets", server.output)) == reloads - 1
        before = served[0]
        wait_for(lambda: served[0] >= before + 20, TIMEOUT)
        done.set()
        for worker in workers:
            worker.join(TIMEOUT)
        assert failures == []
        assert all(not session.closed for session in sessions)
        assert all(client.session is session for client, session in zip(clients, sessions))
        assert not re.search(r"session for load-\d+ ended", server.output)
        listing = http.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).text
        assert f'remotedialer_sessions{{clientkey="load-{agents - 1}",peer="false"}} 1' in listing
    finally:
        for client in clients:
            client.stop(TIMEOUT)
        assert server.stop() == 0
        http.close()
        target.close()


def _seen(proc: Proc, pattern: "re.Pattern[str]", times: int) -> bool:
    return len(pattern.findall(proc.output)) >= times


def test_reload_under_load_of_300_agents_drops_none(tmp_path: Path) -> None:
    reload_under_load(tmp_path, agents=300, reloads=10)


# ------------------------------------------------------------------- mTLS
def test_mtls_certificate_names_the_client_key(tmp_path: Path) -> None:
    """A server terminating TLS with a client CA: an agent with a client
    certificate for ``edge-1`` needs no secret and becomes edge-1; claiming
    another key is 403; no certificate and no secret is 401."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    agent_cert = ca.issue_cert("edge-1")
    paths = {}
    for name, blob in (("ca", ca.cert_pem), ("server", server_cert.private_key_and_cert_chain_pem),
                       ("agent", agent_cert.private_key_and_cert_chain_pem)):
        paths[name] = str(tmp_path / f"{name}.pem")
        blob.write_to_path(paths[name])
    target = Target(tmp_path)
    alice = new_secret()
    creds = tmp_path / "credentials"
    creds.write_text(f"user alice {hash_secret(alice)} edge-*\npolicy edge-* allow=127.0.0.1:{target.port}\n")
    procs: List[Proc] = []
    http = http_session()
    try:
        server = Proc.cli("server", "--listen", "127.0.0.1:0", "--credentials", str(creds),
                          "--tls-cert", paths["server"], "--client-ca", paths["ca"])
        procs.append(server)
        port = int(server.wait_for(re.compile(r"listening on https://127\.0\.0\.1:(\d+)")).group(1))
        url = f"wss://127.0.0.1:{port}/connect"
        procs.append(Proc.cli("client", "--connect", url, "--id", "edge-1", "--cacert", paths["ca"],
                              "--cert", paths["agent"]))
        target_url = f"https://127.0.0.1:{port}/client/edge-1/http/127.0.0.1:{target.port}/index.txt"
        deadline = time.monotonic() + TIMEOUT
        while True:
            response = http.get(target_url, auth=("alice", alice), verify=paths["ca"], timeout=TIMEOUT)
            if response.status_code == 200:
                break
            assert time.monotonic() < deadline, server.output
            time.sleep(0.05)
        assert response.content == BODY
        procs.append(Proc.cli("client", "--connect", url, "--id", "edge-2", "--cacert", paths["ca"],
                              "--cert", paths["agent"]))
        server.wait_for(re.compile(r"refused agent 'edge-2' from 127\.0\.0\.1:\d+: HTTP 403: "
                                   r"the client certificate is for edge-1"))
        procs.append(Proc.cli("client", "--connect", url, "--id", "edge-3", "--cacert", paths["ca"]))
        server.wait_for(re.compile(r"refused agent 'edge-3' from 127\.0\.0\.1:\d+: HTTP 401: missing"))
    finally:
        http.close()
        codes = [proc.stop() for proc in reversed(procs)]
        target.close()
    assert codes == [0] * len(procs)


def test_without_credentials_the_server_says_it_is_open() -> None:
    server = Proc.cli("server", "--listen", "127.0.0.1:0")
    try:
        port = int(server.wait_for(LISTENING).group(1))
        with http_session() as h:  # served: the stop signals are handled by now
            assert h.get(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT).status_code == 200
        assert len(re.findall(r"no --credentials: open server", server.output)) == 1
        assert "credentials from" not in server.output
    finally:
        assert server.stop() == 0
