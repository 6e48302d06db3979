"""remotedialer.server.credentials: the file, secrets, authentication, reload."""

from __future__ import annotations

import base64
import logging
import os
import signal
import threading
from pathlib import Path
from typing import List

import pytest

from remotedialer.errors import AuthenticationError, ForbiddenError
from remotedialer.server.credentials import (
    MIN_SECRET_LENGTH,
    Credentials,
    CredentialsError,
    CredentialStore,
    basic_credentials,
    bearer_token,
    hash_secret,
    new_secret,
)

AGENT = new_secret()
OTHER_AGENT = new_secret()
ALICE = new_secret()
OPS = new_secret()

TEXT = f"""\
# agents
agent {hash_secret(AGENT)} edge-*,db-1
agent {hash_secret(OTHER_AGENT)} old-1 expires=2000-01-01   # long expired

user alice {hash_secret(ALICE)} edge-*
user ops   {hash_secret(OPS)} - admin
policy edge-* allow=127.0.0.1:22 max-connections=4
policy * allow=*
"""


@pytest.fixture
def creds() -> Credentials:
    return Credentials.parse(TEXT, "creds.txt")


def test_secrets_are_random_and_hashes_are_sha256() -> None:
    assert AGENT.startswith("rd_") and len(AGENT) >= MIN_SECRET_LENGTH and AGENT != OTHER_AGENT
    assert hash_secret("x" * 22) == "sha256:" + __import__("hashlib").sha256(b"x" * 22).hexdigest()
    with pytest.raises(ValueError, match="too short"):
        hash_secret("password")
    with pytest.raises(ValueError, match="white space"):
        hash_secret("x" * 22 + " y")


def test_agents_claim_their_keys_only(creds: Credentials) -> None:
    assert creds.authenticate_agent(AGENT, "edge-7").line == 2
    assert creds.authenticate_agent(AGENT, "db-1").key_patterns == ("edge-*", "db-1")
    with pytest.raises(ForbiddenError) as forbidden:
        creds.authenticate_agent(AGENT, "db-2")
    assert forbidden.value.status == 403 and forbidden.value.claimed == "db-2"
    for secret, reason in [(None, "missing secret"), ("", "missing secret"),
                           (new_secret(), "unknown secret"), (OTHER_AGENT, "expired secret"),
                           (ALICE, "unknown secret")]:  # a user secret is no agent secret
        with pytest.raises(AuthenticationError) as info:
            creds.authenticate_agent(secret, "old-1")
        assert (info.value.status, info.value.reason, info.value.claimed) == (401, reason, "old-1")
        assert AGENT not in str(info.value) and (secret or "-") not in str(info.value)


def test_expiry_is_checked_against_now() -> None:
    creds = Credentials.parse(f"agent {hash_secret(AGENT)} k expires=2030-01-01T00:00:00Z\n")
    assert creds.authenticate_agent(AGENT, "k", now=1893455999.0)
    with pytest.raises(AuthenticationError, match="expired"):
        creds.authenticate_agent(AGENT, "k", now=1893456000.0)


def test_users_reach_their_agents_and_admins_the_admin_api(creds: Credentials) -> None:
    alice = creds.authorize_user(ALICE, "edge-1")
    assert (alice.name, alice.is_admin) == ("alice", False)
    with pytest.raises(ForbiddenError):
        creds.authorize_user(ALICE, "db-1")
    with pytest.raises(ForbiddenError):
        creds.authorize_admin(ALICE)
    assert creds.authorize_admin(OPS).name == "ops"
    with pytest.raises(ForbiddenError):  # "-": an admin who reaches no agent
        creds.authorize_user(OPS, "edge-1")
    with pytest.raises(AuthenticationError) as info:
        creds.authorize_user(AGENT, "edge-1")  # an agent secret is no user secret
    assert info.value.claimed == "edge-1"
    with pytest.raises(AuthenticationError):
        creds.authorize_admin(None)


def test_policy_lines_become_the_dial_policy(creds: Credentials) -> None:
    assert creds.policy.check("edge-1", "tcp", "127.0.0.1:22").max_connections == 4
    assert creds.policy.check("db-1", "tcp", "10.0.0.1:5").key_pattern == "*"
    assert "2 agent secrets, 2 users (1 admins), 2 policy lines" == creds.summary()
    assert Credentials.parse("").policy.for_key("x") is None  # no policy: nothing allowed


@pytest.mark.parametrize(
    "line, problem",
    [
        ("agnt x y", "unknown directive 'agnt'"),
        ("agent sha256:00 k", "64 hex digits"),
        ("agent md5:00 k", "expected a secret hash"),
        ("agent " + hash_secret(AGENT), "usage: agent"),
        ("agent " + hash_secret(AGENT) + " -", "at least one client key"),
        ("agent " + hash_secret(AGENT) + " a,,b", "empty pattern"),
        ("agent " + hash_secret(AGENT) + " k expires=soon", "ISO 8601"),
        ("agent " + hash_secret(AGENT) + " k color=red", "unknown option 'color=red'"),
        ("agent " + hash_secret(AGENT) + " k expires=2030-01-01 expires=2031-01-01", "twice"),
        ("user bob " + hash_secret(AGENT), "usage: user"),
        ("user bob " + hash_secret(AGENT) + " * root", "unknown option 'root'"),
        ("policy k allow=10.0.0.0/40", "bad network"),
    ],
)
def test_malformed_lines_name_file_and_line(line: str, problem: str) -> None:
    with pytest.raises(CredentialsError) as info:
        Credentials.parse("# first\n\n" + line + "\n", "/etc/rd/creds")
    assert (info.value.path, info.value.line) == ("/etc/rd/creds", 3)
    assert str(info.value).startswith("/etc/rd/creds:3: ") and problem in str(info.value)


def test_duplicates_are_errors() -> None:
    digest = hash_secret(AGENT)
    with pytest.raises(CredentialsError, match=r":2: the same secret is already used on line 1"):
        Credentials.parse(f"agent {digest} a\nuser u {digest} a\n")
    with pytest.raises(CredentialsError, match=r":2: user 'u' already defined on line 1"):
        Credentials.parse(f"user u {digest} a\nuser u {hash_secret(ALICE)} a\n")


def test_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    encoded = base64.b64encode(b"edge-1:s3:cret").decode()
    assert basic_credentials("Basic " + encoded) == ("edge-1", "s3:cret")
    assert basic_credentials("Basic !!!") is None
    assert basic_credentials("Basic " + base64.b64encode(b"nocolon").decode()) is None
    assert basic_credentials("Bearer x") is None and basic_credentials("") is None


class Request:
    def __init__(self, **headers: str) -> None:
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}
        self.environ: dict = {}


def test_agent_authorizer_reads_the_headers(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_text(TEXT)
    store = CredentialStore.load(str(path))
    request = Request(**{"X_Tunnel_ID": "edge-1", "Authorization": "Bearer " + AGENT})
    assert store.agent_authorizer(request) == ("edge-1", True)
    with pytest.raises(AuthenticationError):
        store.agent_authorizer(Request(**{"X_Tunnel_ID": "edge-1"}))
    with pytest.raises(ForbiddenError):
        store.agent_authorizer(Request(**{"X_Tunnel_ID": "x", "Authorization": "Bearer " + AGENT}))
    with pytest.raises(ValueError, match="X-Tunnel-ID"):
        store.agent_authorizer(Request(Authorization="Bearer " + AGENT))


def test_load_of_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        CredentialStore.load(str(tmp_path / "nope"))


def test_reload_swaps_and_a_bad_file_keeps_the_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "creds"
    path.write_text(f"agent {hash_secret(AGENT)} a\n")
    results: List[bool] = []
    store = CredentialStore.load(str(path), on_reload=results.append)
    before = store.current
    path.write_text(f"agent {hash_secret(AGENT)} b\n")
    assert store.reload() and store.authenticate_agent(AGENT, "b")
    path.write_text(f"agent {hash_secret(AGENT)} c\nbogus\n")
    with caplog.at_level(logging.ERROR):
        assert not store.reload()
    assert f"{path}:2: unknown directive 'bogus'" in caplog.text and "keeping the last good" in caplog.text
    assert store.authenticate_agent(AGENT, "b") and store.current is not before
    path.unlink()
    assert not store.reload() and store.authenticate_agent(AGENT, "b")
    assert results == [True, False, False]


def test_watcher_reloads_on_change_and_on_request(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_text(f"agent {hash_secret(AGENT)} a\n")
    reloaded = threading.Semaphore(0)
    store = CredentialStore.load(str(path), on_reload=lambda ok: reloaded.release())
    store.start_watching(interval=0.05)
    try:
        replacement = tmp_path / "creds.new"
        replacement.write_text(f"agent {hash_secret(AGENT)} renamed\n")
        os.replace(replacement, path)  # an editor's or a config manager's atomic replace
        assert reloaded.acquire(timeout=10)
        assert store.current.agents[0].key_patterns == ("renamed",)
        store.request_reload()
        assert reloaded.acquire(timeout=10)
    finally:
        store.stop_watching()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_requests_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_text(f"agent {hash_secret(AGENT)} a\n")
    reloaded = threading.Event()
    store = CredentialStore.load(str(path), on_reload=lambda ok: reloaded.set())
    previous = signal.getsignal(signal.SIGHUP)
    store.start_watching(interval=3600)  # only the signal can wake it in time
    try:
        assert store.install_sighup()
        os.kill(os.getpid(), signal.SIGHUP)
        assert reloaded.wait(10)
    finally:
        signal.signal(signal.SIGHUP, previous)
        store.stop_watching()


def test_certificate_names() -> None:
    from remotedialer.server.credentials import certificate_names, tls_peer_certificate

    cert = {"subject": ((("commonName", "edge-1"),),),
            "subjectAltName": (("DNS", "edge-1.example"), ("IP Address", "10.0.0.1"), ("DNS", "edge-1"))}
    assert certificate_names(cert) == ["edge-1.example", "edge-1"]
    assert certificate_names({"subject": ((("commonName", "cn-only"),),)}) == ["cn-only"]
    assert certificate_names(None) == [] and certificate_names({}) == []
    assert tls_peer_certificate({}) is None  # not a WSGI server that exposes its socket
    assert tls_peer_certificate({"werkzeug.socket": object()}) is None  # plain TCP
