"""remotedialer.server.policy: target rules, key rules, the dial gate."""

from __future__ import annotations

import errno
import logging
import pickle
import threading
from typing import List

import pytest

from remotedialer.errors import DialRefusedError, RemotedialerError
from remotedialer.server.policy import (
    DialGate,
    DialPolicy,
    KeyPolicy,
    parse_policy_words,
    parse_target,
    parse_targets,
)


@pytest.mark.parametrize(
    "target, proto, address, allowed",
    [
        ("*", "tcp", "example.com:1", True),
        ("*", "unix", "/run/x.sock", True),
        ("10.0.0.0/8:443", "tcp", "10.1.2.3:443", True),
        ("10.0.0.0/8:443", "tcp", "10.1.2.3:444", False),
        ("10.0.0.0/8:443", "tcp", "11.1.2.3:443", False),
        ("10.0.0.0/8", "tcp", "10.1.2.3:1", True),
        ("127.0.0.1:8000-8999", "tcp", "127.0.0.1:8500", True),
        ("127.0.0.1:8000-8999", "tcp", "127.0.0.1:9000", False),
        ("127.0.0.1:22|80", "tcp", "127.0.0.1:80", True),
        ("127.0.0.1:22|80", "tcp", "127.0.0.1:81", False),
        ("[::1/128]:22", "tcp6", "[::1]:22", True),
        ("[::1]:22", "tcp", "[::1]:22", True),
        ("::1", "tcp", "[::1]:8", True),  # a bare IPv6 address: every port
        ("[::1/128]:22", "tcp", "127.0.0.1:22", False),
        ("0.0.0.0/0", "tcp", "[::1]:22", False),  # v4 network never matches v6
        ("*.internal:*", "tcp", "db.internal:5432", True),
        ("*.internal:*", "tcp", "DB.Internal.:5432", True),  # case, trailing dot
        ("*.internal:*", "tcp", "db.internal.evil.com:5432", False),
        ("*.internal", "tcp", "10.0.0.1:5432", False),  # an IP never matches a name glob
        ("*", "tcp", "no-port", True),
        ("db-1:5432", "tcp", "db-1:5432", True),
        ("db-1:5432", "tcp", "db-1:no", False),
        ("10.0.0.0/8", "tcp", "10.0.0.1", False),  # no port: malformed address
        ("10.0.0.0/8", "unix", "/tmp/x", False),
        ("unix:/run/*.sock", "unix", "/run/app.sock", True),
        ("unix:/run/*.sock", "tcp", "127.0.0.1:1", False),
        ("unix:/run/*.sock", "unix", "/etc/passwd", False),
    ],
)
def test_target_rules(target: str, proto: str, address: str, allowed: bool) -> None:
    assert parse_target(target).matches(proto, address) is allowed


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty target"),
        ("10.0.0.0/33:1", "bad network"),
        ("host:70000", "bad port range"),
        ("host:9-1", "bad port range"),
        ("host:x", "bad port"),
        ("[::1", "missing ']'"),
        ("[::1]22", "expected ':PORTS'"),
        ("fe80::zz", "IPv6 target needs brackets"),
        ("unix:", "empty unix path"),
        (":80", "empty host"),
    ],
)
def test_bad_targets_say_why(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_target(text)


def test_first_matching_key_rule_applies() -> None:
    policy = DialPolicy((
        KeyPolicy("edge-1", parse_targets("127.0.0.1:22")),
        KeyPolicy("edge-*", parse_targets("*")),
    ))
    assert policy.check("edge-2", "tcp", "10.0.0.1:80").key_pattern == "edge-*"
    with pytest.raises(DialRefusedError) as info:
        policy.check("edge-1", "tcp", "10.0.0.1:80")
    assert info.value.reason == "target"
    with pytest.raises(DialRefusedError) as info:
        policy.check("db-1", "tcp", "127.0.0.1:22")
    assert info.value.reason == "no-policy"


def test_refusal_is_a_permission_error_shaped_like_the_stdlib() -> None:
    error = DialRefusedError("k", "tcp", "127.0.0.1:1", "target")
    assert isinstance(error, PermissionError) and isinstance(error, RemotedialerError)
    assert error.errno == errno.EACCES and error.args[0] == errno.EACCES
    assert "127.0.0.1:1" in error.strerror and "'k'" in error.strerror
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.args, copy.reason, copy.client_key) == (
        DialRefusedError, error.args, "target", "k")


def test_policy_words() -> None:
    rule = parse_policy_words(["e-*", "allow=10.0.0.0/8:443,*.x:*", "allow=unix:/s",
                               "max-connections=3", "dial-timeout=2.5"], line=7)
    assert (rule.key_pattern, len(rule.allow), rule.max_connections, rule.dial_timeout, rule.line) == (
        "e-*", 3, 3, 2.5, 7)
    assert rule.timeout(None) == 2.5 and rule.timeout(10) == 2.5 and rule.timeout(1) == 1
    assert KeyPolicy("x").timeout(None) is None
    for words, problem in [
        ([], "client-key pattern"),
        (["k", "allow"], "NAME=VALUE"),
        (["k", "deny=1"], "unknown policy option"),
        (["k", "max-connections=0"], "positive"),
        (["k", "max-connections=x"], "must be a number"),
        (["k", "dial-timeout=-1"], "positive"),
        (["k", "allow=db:1:2"], "brackets"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_policy_words(words)


def test_gate_caps_connections_and_counts_in_flight(caplog: pytest.LogCaptureFixture) -> None:
    policy = DialPolicy((KeyPolicy("k", parse_targets("*"), max_connections=2, dial_timeout=3),))
    refusals: List[DialRefusedError] = []
    gate = DialGate(lambda: policy, refusals.append)
    open_now = [0]
    with gate.admit("k", "tcp", "127.0.0.1:1", 10, lambda: open_now[0]) as timeout:
        assert timeout == 3
        assert gate.in_flight("k") == 1 and gate.in_flight() == 1
        with gate.admit("k", "tcp", "127.0.0.1:1", None, lambda: open_now[0]):
            assert gate.in_flight_by_key() == {"k": 2}
            with caplog.at_level(logging.WARNING), pytest.raises(DialRefusedError) as info:
                with gate.admit("k", "tcp", "127.0.0.1:1", None, lambda: open_now[0]):
                    pass  # pragma: no cover
            assert info.value.reason == "max-connections"
    assert gate.in_flight() == 0 and gate.in_flight_by_key() == {}
    open_now[0] = 2  # both dials became open connections
    with pytest.raises(DialRefusedError):
        with gate.admit("k", "tcp", "127.0.0.1:1", None, lambda: open_now[0]):
            pass  # pragma: no cover
    assert [r.reason for r in refusals] == ["max-connections", "max-connections"]
    assert "refused dial tcp/127.0.0.1:1 through k" in caplog.text


def test_gate_refuses_by_policy_and_counts_down_after_errors() -> None:
    policy = DialPolicy((KeyPolicy("k", parse_targets("127.0.0.1:22")),))
    refusals: List[DialRefusedError] = []
    gate = DialGate(lambda: policy, refusals.append)
    with pytest.raises(DialRefusedError):
        with gate.admit("k", "tcp", "127.0.0.1:23", None, lambda: 0):
            pass  # pragma: no cover
    with pytest.raises(DialRefusedError):
        with gate.admit("other", "tcp", "127.0.0.1:22", None, lambda: 0):
            pass  # pragma: no cover
    with pytest.raises(OSError):
        with gate.admit("k", "tcp", "127.0.0.1:22", 5, lambda: 0) as timeout:
            assert timeout == 5
            raise OSError("the dial failed")
    assert gate.in_flight() == 0
    assert [r.reason for r in refusals] == ["target", "no-policy"]


def test_no_policy_source_admits_everything() -> None:
    gate = DialGate(lambda: None)
    with gate.admit("k", "unix", "/x", 1.5, lambda: 10**6) as timeout:
        assert timeout == 1.5


def test_gate_cap_holds_under_concurrent_admission() -> None:
    """Twenty threads race for a cap of five: exactly five get in."""
    policy = DialPolicy((KeyPolicy("k", parse_targets("*"), max_connections=5),))
    gate = DialGate(lambda: policy)
    start, release = threading.Barrier(20), threading.Event()
    admitted: List[int] = []
    refused: List[int] = []
    lock = threading.Lock()

    def racer(n: int) -> None:
        start.wait(5)
        try:
            with gate.admit("k", "tcp", "127.0.0.1:1", None, lambda: 0):
                with lock:
                    admitted.append(n)
                release.wait(5)
        except DialRefusedError:
            with lock:
                refused.append(n)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for _ in range(500):
        with lock:
            if len(admitted) + len(refused) == 20:
                break
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join(5)
    assert len(admitted) == 5 and gate.in_flight() == 0
