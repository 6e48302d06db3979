"""Real proxy clients through the proxy front end and a real tunnel, each
allowed and refused: curl (CONNECT to https, absolute-form http, SOCKS5 with
the host name), requests (``http`` and ``socks5h`` proxies), ssh to a local
sshd through ``ncat`` as its ProxyCommand (HTTP CONNECT and SOCKS5) and
through ``nc -X connect`` (OpenBSD netcat, which asks for the proxy password
on its terminal), and kubectl with ``HTTPS_PROXY`` against a local TLS
stand-in for an API server.

The binaries come from Debian (``.ci/run`` installs them); a test skips only
when its binary is missing."""

from __future__ import annotations

import getpass
import json
import os
import pty
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from remotedialer.gateway.proxy import ProxyFrontEnd
from remotedialer.piping import Piper, dial_socket
from remotedialer.server.credentials import Credentials, CredentialStore, hash_secret, new_secret
from testkit.support import TIMEOUT, TunnelServer, wait_for

PASSWORD = new_secret()
#: A name only the agent resolves (to 127.0.0.1): Go clients such as
#: kubectl never send loopback addresses to a proxy.
AGENT_ONLY_NAME = "kube.test"


#: alice may reach the agent ``foo`` only, which may dial anything.
CREDENTIALS = f"user alice {hash_secret(PASSWORD)} foo\npolicy * allow=*\n"


def agent_dialer(proto: str, address: str, timeout: Optional[float]) -> socket.socket:
    """The agent's local dials, with :data:`AGENT_ONLY_NAME` resolving to 127.0.0.1."""
    if address.startswith(AGENT_ONLY_NAME + ":"):
        address = "127.0.0.1" + address[len(AGENT_ONLY_NAME):]
    return dial_socket(proto, address, timeout)


def need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        pytest.skip(f"{binary} is not installed (.ci/run installs it)")
    return path


class Targets:
    """An HTTP and an HTTPS server on loopback (trustme certificates)."""

    def __init__(self, tmp: Path) -> None:
        import trustme
        from werkzeug.serving import make_server
        from werkzeug.wrappers import Request, Response

        @Request.application
        def app(request: Request) -> Response:
            if request.path == "/version":  # what kubectl asks an API server
                body = {"major": "1", "minor": "29", "gitVersion": "v1.29.0-standin"}
                return Response(json.dumps(body), content_type="application/json")
            return Response(f"hello {request.method} {request.path}", content_type="text/plain")

        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost", AGENT_ONLY_NAME)
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self.http = make_server("127.0.0.1", 0, app, threaded=True)
        self.https = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
        servers = (self.http, self.https)
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        for server in (self.http, self.https):
            server.shutdown()
            server.server_close()


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.piper = Piper("e2e-proxy-piper")
        self.tunnel = TunnelServer(piper=self.piper)
        self.tunnel.client("foo", dialer=agent_dialer)
        store = CredentialStore(Credentials.parse(CREDENTIALS))
        self.proxy = ProxyFrontEnd(self.tunnel.server.dial, authorize=store.authorize_user, piper=self.piper)
        self.targets = Targets(tmp)

    @property
    def port(self) -> int:
        return int(self.proxy.address[1])

    def proxy_url(self, scheme: str = "http", key: str = "foo", password: str = PASSWORD) -> str:
        return f"{scheme}://{key}:{password}@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proxy.stop()
        self.targets.close()
        self.tunnel.close()
        self.piper.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = Env(tmp_path)
    yield environment
    environment.close()


def run(args: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT * 3, env=env)


# -------------------------------------------------------------------- curl
def test_curl_connect_to_https(env: Env) -> None:
    curl = need("curl")
    url = f"https://localhost:{env.targets.https.server_port}/tls"
    ok = run([curl, "-sS", "--cacert", str(env.targets.ca_file), "-x", env.proxy_url(), url])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello GET /tls"
    for key, password, status in (("foo", "wrong", "407"), ("bar", PASSWORD, "403")):
        refused = run([curl, "-sS", "--cacert", str(env.targets.ca_file), "-x",
                       env.proxy_url(key=key, password=password), url])
        assert refused.returncode != 0
        assert status in refused.stderr, refused.stderr


def test_curl_absolute_form(env: Env) -> None:
    curl = need("curl")
    url = f"http://127.0.0.1:{env.targets.http.server_port}/plain?x=1"
    ok = run([curl, "-sS", "-x", env.proxy_url(), url])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello GET /plain"
    for key, password, status in (("foo", "wrong", "407"), ("bar", PASSWORD, "403")):
        refused = run([curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x",
                       env.proxy_url(key=key, password=password), url])
        assert refused.stdout == status


def test_curl_socks5_hostname(env: Env) -> None:
    curl = need("curl")
    url = f"http://localhost:{env.targets.http.server_port}/socks"
    ok = run([curl, "-sS", "--socks5-hostname", f"foo:{PASSWORD}@127.0.0.1:{env.port}", url])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello GET /socks"
    wrong = run([curl, "-sS", "--socks5-hostname", f"foo:wrong@127.0.0.1:{env.port}", url])
    assert wrong.returncode == 97, wrong.stderr  # CURLE_PROXY: "User was rejected by the SOCKS5 server"
    other = run([curl, "-sS", "--socks5-hostname", f"bar:{PASSWORD}@127.0.0.1:{env.port}", url])
    assert other.returncode == 97, other.stderr
    assert "(2)" in other.stderr or "not allowed" in other.stderr.lower(), other.stderr  # reply 0x02


# ---------------------------------------------------------------- requests
def test_requests_http_and_socks5h(env: Env) -> None:
    import requests

    http_url = f"http://127.0.0.1:{env.targets.http.server_port}/req"
    https_url = f"https://localhost:{env.targets.https.server_port}/req-tls"
    ca = str(env.targets.ca_file)
    for scheme in ("http", "socks5h"):
        proxies = {"http": env.proxy_url(scheme), "https": env.proxy_url(scheme)}
        assert requests.get(http_url, proxies=proxies, timeout=TIMEOUT).text == "hello GET /req"
        answer = requests.get(https_url, proxies=proxies, verify=ca, timeout=TIMEOUT)
        assert answer.text == "hello GET /req-tls"
    bad = {"http": env.proxy_url(password="wrong"), "https": env.proxy_url(password="wrong")}
    assert requests.get(http_url, proxies=bad, timeout=TIMEOUT).status_code == 407
    with pytest.raises(requests.exceptions.ProxyError, match="407"):
        requests.get(https_url, proxies=bad, verify=ca, timeout=TIMEOUT)
    bad_socks = {"http": env.proxy_url("socks5h", password="wrong")}
    with pytest.raises(requests.exceptions.ConnectionError, match="(?i)authentication failed"):
        requests.get(http_url, proxies=bad_socks, timeout=TIMEOUT)
    other_socks = {"http": env.proxy_url("socks5h", key="bar")}
    with pytest.raises(requests.exceptions.ConnectionError, match="(?i)not allowed by ruleset"):
        requests.get(http_url, proxies=other_socks, timeout=TIMEOUT)


# --------------------------------------------------------------------- ssh
class Sshd:
    """A real sshd on a free loopback port, accepting one key for this user."""

    def __init__(self, tmp: Path) -> None:
        sshd = need("sshd")
        keygen = need("ssh-keygen")
        self.dir = tmp / "ssh"
        self.dir.mkdir()
        for name in ("host", "client"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client.pub").read_text())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        self.process = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._ready)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            errors = self.process.stderr.read().decode() if self.process.stderr else ""
            raise AssertionError(f"sshd ended: {errors}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def ssh_args(self, proxy_command: str) -> List[str]:
        return [need("ssh"), "-F", "/dev/null", "-i", str(self.dir / "client"),
                "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", f"ProxyCommand={proxy_command}", "-o", "ConnectTimeout=20",
                "-p", str(self.port), f"{getpass.getuser()}@127.0.0.1", "echo", "through-the-proxy"]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(TIMEOUT)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path)
    yield server
    server.close()


@pytest.mark.parametrize("proxy_type", ["http", "socks5"])
def test_ssh_through_ncat(env: Env, sshd: Sshd, proxy_type: str) -> None:
    ncat = need("ncat")

    def command(key: str, password: str) -> str:
        return (f"{ncat} --proxy 127.0.0.1:{env.port} --proxy-type {proxy_type} "
                f"--proxy-auth {key}:{password} %h %p")

    ok = run(sshd.ssh_args(command("foo", PASSWORD)))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "through-the-proxy"
    for key, password in (("foo", "wrong"), ("bar", PASSWORD)):
        refused = run(sshd.ssh_args(command(key, password)))
        assert refused.returncode == 255, refused.stderr
        assert "through-the-proxy" not in refused.stdout


def ssh_on_a_terminal(args: List[str], password: str) -> Tuple[int, str]:
    """Run ``args`` on a new pseudo-terminal (``nc -X connect -P user`` asks
    for the proxy password there) answering the prompt; (status, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.execv(args[0], args)
        finally:
            os._exit(127)
    output = b""
    answered = False
    deadline = time.monotonic() + TIMEOUT * 3
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not answered and b"assword" in output:
                os.write(fd, password.encode() + b"\n")
                answered = True
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")


@pytest.mark.parametrize("password,ok", [(PASSWORD, True), ("wrong", False)])
def test_ssh_through_openbsd_nc_connect(env: Env, sshd: Sshd, password: str, ok: bool) -> None:
    nc = need("nc")
    if b"-X proxy_protocol" not in subprocess.run([nc, "-h"], capture_output=True).stderr:
        pytest.skip("nc is not OpenBSD netcat (.ci/run installs netcat-openbsd)")
    args = sshd.ssh_args(f"{nc} -X connect -x 127.0.0.1:{env.port} -P foo %h %p")
    status, output = ssh_on_a_terminal(args, password)
    if ok:
        assert status == 0, output
        assert "through-the-proxy" in output
    else:
        assert status != 0
        assert "through-the-proxy" not in output
        assert "Proxy authentication failed" in output


# ----------------------------------------------------------------- kubectl
def test_kubectl_https_proxy(env: Env) -> None:
    kubectl = need("kubectl")
    kubeconfig = env.tmp / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {
            "server": f"https://{AGENT_ONLY_NAME}:{env.targets.https.server_port}",
            "certificate-authority": str(env.targets.ca_file)}}],
        "users": [{"name": "u", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u"}}],
    }))

    def kubectl_version(proxy: str) -> subprocess.CompletedProcess[str]:
        variables = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
        variables.update(HTTPS_PROXY=proxy, HOME=str(env.tmp), KUBECONFIG=str(kubeconfig))
        return run([kubectl, "get", "--raw", "/version", "--request-timeout=20s"], env=variables)

    ok = kubectl_version(env.proxy_url())
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["gitVersion"] == "v1.29.0-standin"
    refused = kubectl_version(env.proxy_url(password="wrong"))
    assert refused.returncode != 0
    assert "Proxy Authentication Required" in refused.stderr, refused.stderr  # 407
    forbidden = kubectl_version(env.proxy_url(key="bar"))
    assert forbidden.returncode != 0
    assert "Forbidden" in forbidden.stderr, forbidden.stderr  # 403


def test_every_client_left_nothing_open(env: Env) -> None:
    """After a client is done, its piped connection ends (curl as the probe)."""
    curl = need("curl")
    url = f"http://127.0.0.1:{env.targets.http.server_port}/x"
    assert run([curl, "-sS", "-x", env.proxy_url(), url]).returncode == 0
    wait_for(lambda: env.proxy.active == 0 and env.proxy.handshaking == 0)


# ------------------------------------------------- remotedialer server --proxy-listen
def test_server_cli_proxy_listen(tmp_path: Path) -> None:
    """The real processes: ``remotedialer server --credentials FILE
    --proxy-listen`` and ``remotedialer client`` with its agent secret; curl
    through the proxy port, allowed and refused (bad secret, another agent,
    a target the policy refuses); a silent connection on either port is
    closed after ``--header-timeout``."""
    import re

    from testkit.cli import LISTENING, Proc, cli_env

    curl = need("curl")
    agent_secret = new_secret()
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"agent {hash_secret(agent_secret)} foo\n"
        f"user alice {hash_secret(PASSWORD)} foo\n"
        "policy foo allow=127.0.0.1:1024-65535,localhost:1024-65535\n"
    )
    server = Proc.cli("server", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0",
                      "--header-timeout", "1", "--credentials", str(credentials))
    client: Optional[Proc] = None
    try:
        port = server.wait_for(LISTENING).group(1)
        proxy_port = server.wait_for(re.compile(r"proxy 127\.0\.0\.1:(\d+): listening")).group(1)
        assert "no user credentials configured" not in server.output
        client = Proc.cli("client", "--connect", f"ws://127.0.0.1:{port}/connect", "--id", "foo",
                          env=cli_env(REMOTEDIALER_TOKEN=agent_secret))
        server.wait_for(re.compile(r"client session started for foo"))

        def status(key: str, password: str, url: str) -> str:
            answer = run([curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x",
                          f"http://{key}:{password}@127.0.0.1:{proxy_port}", url])
            return answer.stdout

        healthz = f"http://127.0.0.1:{port}/healthz"
        ok = run([curl, "-sS", "-x", f"http://foo:{PASSWORD}@127.0.0.1:{proxy_port}", healthz])
        assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
        ok = run([curl, "-sS", "--socks5-hostname", f"foo:{PASSWORD}@127.0.0.1:{proxy_port}",
                  f"http://localhost:{port}/healthz"])
        assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
        assert status("foo", "wrong-secret", healthz) == "407"
        assert status("bar", PASSWORD, healthz) == "403"  # alice may not reach bar
        assert status("foo", PASSWORD, "http://127.0.0.1:1/") == "403"  # the policy refuses
        for silent_port in (port, proxy_port):
            with socket.create_connection(("127.0.0.1", int(silent_port)), timeout=TIMEOUT) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\n")
                started = time.monotonic()
                while sock.recv(4096):  # an HTTP 408 from the proxy, then the end
                    pass
                assert time.monotonic() - started < TIMEOUT
    finally:
        if client is not None:
            client.stop()
        assert server.stop() == 0, server.output
