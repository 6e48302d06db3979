"""Dial policy per client key: which targets may be dialed through each agent.

A :class:`DialPolicy` is an ordered list of :class:`KeyPolicy` rules; the
first whose client-key glob matches a key applies to it (like a firewall's
rules). A key that no rule matches may dial nothing. A rule lists the targets
it allows, caps the connections open through the agent at once, and caps the
time a dial may wait for the tunnel::

    policy = DialPolicy([
        KeyPolicy("edge-*", allow=parse_targets("10.0.0.0/8:443,*.internal:*"),
                  max_connections=100, dial_timeout=10),
    ])
    server = Server(authorizer, dial_policy=lambda: policy)

Targets (:func:`parse_target`): an IP network with optional ports
(``10.0.0.0/8:443``, ``[::1/128]:22``, ``127.0.0.1:8000-8999``), a host-name
glob with ports (``*.internal:*``, ``db-1:5432``), ``unix:<path glob>``, or
``*`` (anything). A name matches name globs only, never networks: the agent
resolves it, so the server cannot know its address.

:class:`DialGate` is the state :class:`~remotedialer.server.Server` keeps to
enforce a policy: the dials in flight per key (a gauge) and the connection cap.
A refusal raises :class:`~remotedialer.errors.DialRefusedError` (a
``PermissionError``, ``errno`` ``EACCES``) after one log line.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, TypeVar, Union

from ..addresses import split_host_port
from ..errors import DialRefusedError

__all__ = [
    "TargetRule",
    "Target",
    "KeyPolicy",
    "DialPolicy",
    "DialGate",
    "PolicySource",
    "parse_target",
    "parse_targets",
    "key_matches",
]

log = logging.getLogger(__name__)

#: Every port.
ALL_PORTS: Tuple[Tuple[int, int], ...] = ((0, 65535),)

NumberT = TypeVar("NumberT", int, float)
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def key_matches(pattern: str, client_key: str) -> bool:
    """Whether ``client_key`` matches the glob ``pattern`` (``*``, ``?``,
    ``[...]``; case-sensitive, as client keys are)."""
    return fnmatch.fnmatchcase(client_key, pattern)


@dataclass(frozen=True)
class TargetRule:
    """One allowed target: ``kind`` is ``"any"``, ``"network"`` (``network``
    set), ``"host"`` (``pattern`` is a lower-case name glob) or ``"unix"``
    (``pattern`` is a path glob); ``ports`` are inclusive ranges."""

    kind: str
    pattern: str = ""
    network: Optional[Network] = None
    ports: Tuple[Tuple[int, int], ...] = ALL_PORTS
    text: str = ""

    def matches(self, proto: str, address: str) -> bool:
        """Whether this rule allows dialing ``proto/address``."""
        return self.matches_target(Target.of(proto, address))

    def matches_target(self, target: "Target") -> bool:
        """:meth:`matches` for a target parsed once (:meth:`Target.of`)."""
        if self.kind == "any":
            return True
        if target.path is not None:
            return self.kind == "unix" and fnmatch.fnmatchcase(target.path, self.pattern)
        if self.kind == "unix" or target.port is None:
            return False
        port = target.port
        if not any(low <= port <= high for low, high in self.ports):
            return False
        if self.kind == "network":
            assert self.network is not None
            ip = target.ip
            return ip is not None and ip.version == self.network.version and ip in self.network
        return target.ip is None and fnmatch.fnmatchcase(target.host, self.pattern)


@dataclass(frozen=True)
class Target:
    """A dial target parsed for matching: a unix ``path``, or a ``host``
    (lower case, no trailing dot), ``port`` and ``ip`` (``None`` for a name);
    ``port`` is ``None`` when the address does not parse."""

    path: Optional[str] = None
    host: str = ""
    port: Optional[int] = None
    ip: Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]] = None

    @classmethod
    def of(cls, proto: str, address: str) -> "Target":
        """Parse ``proto/address``."""
        if proto == "unix":
            return cls(path=address)
        try:
            host, port = split_host_port(address)
        except ValueError:
            return cls()
        try:
            ip: Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]] = ipaddress.ip_address(
                host.split("%", 1)[0]
            )
        except ValueError:
            ip = None
        return cls(host=host.lower().rstrip("."), port=port, ip=ip)


def _parse_ports(text: str, target: str) -> Tuple[Tuple[int, int], ...]:
    if text == "*":
        return ALL_PORTS
    ranges = []
    for part in text.split("|"):
        low_text, _, high_text = part.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if high_text else low
        except ValueError:
            raise ValueError(f"bad port {part!r} in target {target!r}") from None
        if not 0 <= low <= high <= 65535:
            raise ValueError(f"bad port range {part!r} in target {target!r}")
        ranges.append((low, high))
    return tuple(ranges)


def parse_target(text: str) -> TargetRule:
    """Parse one target (see the module doc); raises ``ValueError`` saying
    what is wrong. Ports: ``N``, ``N-M``, ``*``, or several joined by ``|``;
    without ports, every port."""
    text = text.strip()
    if not text:
        raise ValueError("empty target")
    if text == "*":
        return TargetRule("any", text=text)
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("empty unix path in target 'unix:'")
        return TargetRule("unix", pattern=path, text=text)
    host, ports = text, ALL_PORTS
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in target {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':PORTS' after ']' in target {text!r}")
            ports = _parse_ports(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        ports = _parse_ports(port_text, text)
    if not host:
        raise ValueError(f"empty host in target {text!r}")
    if "/" in host or _is_ip(host):
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError as exc:
            raise ValueError(f"bad network in target {text!r}: {exc}") from None
        return TargetRule("network", network=network, ports=ports, text=text)
    if ":" in host:
        raise ValueError(f"IPv6 target needs brackets: [{host}]:PORTS in {text!r}")
    return TargetRule("host", pattern=host.lower().rstrip("."), ports=ports, text=text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_targets(text: str) -> Tuple[TargetRule, ...]:
    """Comma-separated targets (see :func:`parse_target`)."""
    return tuple(parse_target(part) for part in text.split(","))


@dataclass(frozen=True)
class KeyPolicy:
    """What the agents whose client key matches ``key_pattern`` may be asked
    to dial: ``allow`` (targets), ``max_connections`` open at once through
    the agent (``None``: no cap), ``dial_timeout`` in seconds (``None``: the
    caller's). ``line`` is where it came from in a file (0: not from one)."""

    key_pattern: str
    allow: Tuple[TargetRule, ...] = ()
    max_connections: Optional[int] = None
    dial_timeout: Optional[float] = None
    line: int = 0

    def allows(self, proto: str, address: str) -> bool:
        """Whether one of the targets allows ``proto/address``."""
        target = Target.of(proto, address)
        return any(rule.matches_target(target) for rule in self.allow)

    def timeout(self, requested: Optional[float]) -> Optional[float]:
        """The dial timeout to use: ``requested``, lowered to ``dial_timeout``."""
        if self.dial_timeout is None:
            return requested
        if requested is None:
            return self.dial_timeout
        return min(requested, self.dial_timeout)


@dataclass(frozen=True)
class DialPolicy:
    """Ordered :class:`KeyPolicy` rules; the first matching one applies."""

    rules: Tuple[KeyPolicy, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def for_key(self, client_key: str) -> Optional[KeyPolicy]:
        """The rule for ``client_key``, or ``None`` (every dial refused)."""
        for rule in self.rules:
            if key_matches(rule.key_pattern, client_key):
                return rule
        return None

    def check(self, client_key: str, proto: str, address: str) -> KeyPolicy:
        """The rule allowing ``proto/address`` through ``client_key``; raises
        :class:`~remotedialer.errors.DialRefusedError` (``reason``
        ``"no-policy"`` or ``"target"``) otherwise. Does not log."""
        rule = self.for_key(client_key)
        if rule is None:
            raise DialRefusedError(client_key, proto, address, "no-policy")
        if not rule.allows(proto, address):
            raise DialRefusedError(client_key, proto, address, "target")
        return rule


PolicySource = Callable[[], Optional[DialPolicy]]
"""Returns the policy in force now (``None``: dial anything), read on every
dial, so a reload takes effect on the next one."""

RefusalListener = Callable[[DialRefusedError], None]


class DialGate:
    """Enforces a :data:`PolicySource` around each dial: target rules, the
    connection cap and the dial timeout; counts dials in flight per key.

    ``on_refused`` hears every refusal (after the log line), e.g. a metric.
    """

    def __init__(self, source: PolicySource, on_refused: Optional[RefusalListener] = None) -> None:
        self.source = source
        self.on_refused = on_refused
        self._lock = threading.Lock()
        self._in_flight: Dict[str, int] = {}  # guarded by _lock: key -> dials not yet registered

    def in_flight(self, client_key: Optional[str] = None) -> int:
        """Dials in flight through ``client_key`` (all keys if ``None``)."""
        with self._lock:
            if client_key is None:
                return sum(self._in_flight.values())
            return self._in_flight.get(client_key, 0)

    def in_flight_by_key(self) -> Dict[str, int]:
        """A snapshot of the dials in flight, by key (keys with none left out)."""
        with self._lock:
            return dict(self._in_flight)

    @contextmanager
    def admit(
        self,
        client_key: str,
        proto: str,
        address: str,
        timeout: Optional[float],
        open_connections: Callable[[], int],
    ) -> Iterator[Optional[float]]:
        """Admit one dial: yields the timeout to dial with and counts the dial
        in flight until the block ends (by then the caller has registered the
        connection, which ``open_connections()`` counts). Raises
        :class:`~remotedialer.errors.DialRefusedError` after logging it when
        the policy refuses, or when ``open_connections()`` plus the dials in
        flight reach the key's ``max_connections``."""
        policy = self.source()
        rule: Optional[KeyPolicy] = None
        if policy is not None:
            try:
                rule = policy.check(client_key, proto, address)
            except DialRefusedError as exc:
                self._refused(exc)
                raise
        with self._lock:
            flying = self._in_flight.get(client_key, 0)
            cap = rule.max_connections if rule is not None else None
            if cap is not None and open_connections() + flying >= cap:
                refusal: Optional[DialRefusedError] = DialRefusedError(
                    client_key, proto, address, "max-connections", f"{cap} connections open"
                )
            else:
                refusal = None
                self._in_flight[client_key] = flying + 1
        if refusal is not None:
            self._refused(refusal)
            raise refusal
        try:
            yield rule.timeout(timeout) if rule is not None else timeout
        finally:
            with self._lock:
                left = self._in_flight[client_key] - 1
                if left:
                    self._in_flight[client_key] = left
                else:
                    del self._in_flight[client_key]

    def _refused(self, error: DialRefusedError) -> None:
        log.warning("refused dial %s/%s through %s: %s", error.proto, error.address,
                    error.client_key, error.strerror)
        if self.on_refused is not None:
            try:
                self.on_refused(error)
            except Exception:
                log.exception("dial refusal listener failed")


def policy_from_lines(lines: Sequence[Tuple[int, Sequence[str]]]) -> DialPolicy:
    """A policy from ``(line number, words)`` of ``policy`` directives (the
    words after ``policy``); raises ``ValueError`` naming the line."""
    return DialPolicy(tuple(parse_policy_words(words, line) for line, words in lines))


def parse_policy_words(words: Sequence[str], line: int = 0) -> KeyPolicy:
    """``<client-key-glob> allow=T[,T...] [max-connections=N] [dial-timeout=S]``."""
    if not words:
        raise ValueError("policy needs a client-key pattern")
    pattern, options = words[0], words[1:]
    allow: Tuple[TargetRule, ...] = ()
    max_connections: Optional[int] = None
    dial_timeout: Optional[float] = None
    for option in options:
        name, equals, value = option.partition("=")
        if not equals or not value:
            raise ValueError(f"expected NAME=VALUE, got {option!r}")
        if name == "allow":
            allow += parse_targets(value)
        elif name == "max-connections":
            max_connections = _positive(value, name, int)
        elif name == "dial-timeout":
            dial_timeout = _positive(value, name, float)
        else:
            raise ValueError(f"unknown policy option {name!r} (allow, max-connections, dial-timeout)")
    return KeyPolicy(pattern, allow, max_connections, dial_timeout, line)


def _positive(value: str, name: str, kind: Callable[[str], NumberT]) -> NumberT:
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not number > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return number
