"""Agent and user credentials: a file of hashed secrets, and its live reload.

The credentials file is line-based; ``#`` starts a comment, blank lines are
ignored, and each line is one directive::

    # agents: which secret may claim which client keys
    agent sha256:5e88...  edge-*,db-1          [expires=2027-01-31]
    # users of the ways in (/client/, the proxy front end, the admin API)
    user  alice  sha256:9b2c...  edge-*        [expires=2027-01-31T12:00:00Z]
    user  ops    sha256:77af...  *  admin
    # which targets each agent may be asked to dial (remotedialer.server.policy)
    policy edge-*  allow=10.0.0.0/8:443,*.internal:*  max-connections=100  dial-timeout=10

Client keys and agents are globs (``*``, ``?``, ``[...]``), several joined
by commas; ``-`` is none (an admin who reaches no agent). ``admin`` gives a
user the admin API. ``expires`` is an ISO 8601 date or time (UTC unless it
says otherwise); past it, the secret is refused as if unknown, with its own
log reason.

**Secrets** are made by :func:`new_secret` (``remotedialer server
--new-secret``): 32 random bytes, URL-safe base64 with an ``rd_`` prefix. The
file holds only ``sha256:<hex>`` of each. A salted, slow hash (scrypt,
PBKDF2) protects *guessable* passwords from an offline search; a 256-bit
random secret cannot be guessed, so one SHA-256 is as strong and costs a
microsecond, where scrypt's tens of milliseconds would turn 300 agents
reconnecting at once into seconds of CPU. The same property lets a secret
alone name its entry: the proxy front end gets a client key and a secret, no
user name. :func:`hash_secret` refuses secrets shorter than
:data:`MIN_SECRET_LENGTH`. Every check compares the digest with every entry's
in constant time (:func:`hmac.compare_digest`, no early exit).

Agent secrets and user secrets are separate: the same secret in an ``agent``
and a ``user`` line is an error, so an agent cannot use the ways in.

:class:`Credentials` is one parsed file (immutable); :class:`CredentialStore`
holds the one in force and swaps it on :meth:`CredentialStore.reload`, on
SIGHUP and when the file changes; a file that does not parse leaves the last
good one in force and the reason is logged. Sessions are never touched by a
reload: a new file applies to the next handshake and the next dial.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

from ..errors import AuthenticationError, ForbiddenError, RemotedialerError
from ..transports.wsgi import UnsupportedServerError, socket_from_environ
from .policy import DialPolicy, key_matches, parse_policy_words

__all__ = [
    "AgentCredential",
    "UserCredential",
    "Credentials",
    "CredentialStore",
    "CredentialsError",
    "new_secret",
    "hash_secret",
    "bearer_token",
    "basic_credentials",
    "tls_peer_certificate",
    "certificate_names",
    "MIN_SECRET_LENGTH",
]

log = logging.getLogger(__name__)

#: Characters a secret must have at least (:func:`new_secret` makes 46).
MIN_SECRET_LENGTH = 22

_HASH_PREFIX = "sha256:"


class CredentialsError(RemotedialerError, ValueError):
    """A credentials file that does not parse: ``path``, ``line`` (1-based;
    0 for the file as a whole) and what is wrong, in the message as
    ``path:line: problem``."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


def new_secret() -> str:
    """A fresh secret: ``rd_`` and 32 random bytes in URL-safe base64."""
    return "rd_" + secrets.token_urlsafe(32)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def hash_secret(secret: str) -> str:
    """The file form of ``secret``: ``sha256:<hex>``. Raises ``ValueError``
    for a secret shorter than :data:`MIN_SECRET_LENGTH` or with white space
    (it could not be sent in a header as typed)."""
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"secret too short ({len(secret)} characters, at least {MIN_SECRET_LENGTH}): "
            "use remotedialer server --new-secret"
        )
    if any(c.isspace() for c in secret):
        raise ValueError("secret contains white space")
    return _HASH_PREFIX + _digest(secret).hex()


def _parse_hash(text: str) -> bytes:
    if not text.startswith(_HASH_PREFIX):
        raise ValueError(f"expected a secret hash sha256:<64 hex digits>, got {text[:20]!r}")
    try:
        digest = bytes.fromhex(text[len(_HASH_PREFIX):])
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError("a sha256: hash has 64 hex digits")
    return digest


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` value, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def basic_credentials(authorization: Optional[str]) -> Optional[Tuple[str, str]]:
    """``(username, password)`` of a ``Basic`` (Proxy-)Authorization value,
    else ``None``."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, colon, password = decoded.partition(":")
    if not colon:
        return None
    return username, password


def _parse_expiry(text: str) -> float:
    value = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expires must be an ISO 8601 date or time, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _parse_globs(text: str) -> Tuple[str, ...]:
    if text == "-":
        return ()
    globs = tuple(part for part in text.split(","))
    if any(not glob for glob in globs):
        raise ValueError(f"empty pattern in {text!r}")
    return globs


@dataclass(frozen=True)
class AgentCredential:
    """An ``agent`` line: the secret's ``digest`` may claim the client keys
    matching ``key_patterns`` until ``expires`` (a Unix time, or ``None``)."""

    digest: bytes = field(repr=False)
    key_patterns: Tuple[str, ...]
    expires: Optional[float] = None
    line: int = 0

    def may_claim(self, client_key: str) -> bool:
        """Whether this secret may open tunnels as ``client_key``."""
        return any(key_matches(pattern, client_key) for pattern in self.key_patterns)


@dataclass(frozen=True)
class UserCredential:
    """A ``user`` line: ``name`` reaches the agents whose keys match
    ``agent_patterns``; ``is_admin`` may use the admin API."""

    name: str
    digest: bytes = field(repr=False)
    agent_patterns: Tuple[str, ...]
    is_admin: bool = False
    expires: Optional[float] = None
    line: int = 0

    def may_reach(self, client_key: str) -> bool:
        """Whether this user may dial through the agent ``client_key``."""
        return any(key_matches(pattern, client_key) for pattern in self.agent_patterns)


EntryT = TypeVar("EntryT", AgentCredential, UserCredential)


def _find(entries: Sequence[EntryT], secret: str) -> Optional[EntryT]:
    """The entry whose digest is the secret's: every entry is compared, in
    constant time, whatever matches."""
    digest = _digest(secret)
    found: Optional[EntryT] = None
    for entry in entries:
        if hmac.compare_digest(entry.digest, digest) and found is None:
            found = entry
    return found


def _check_expiry(expires: Optional[float], now: Optional[float], claimed: str) -> None:
    if expires is not None and (time.time() if now is None else now) >= expires:
        raise AuthenticationError("expired secret", claimed)


@dataclass(frozen=True)
class Credentials:
    """One parsed credentials file (see the module doc); immutable."""

    agents: Tuple[AgentCredential, ...] = ()
    users: Tuple[UserCredential, ...] = ()
    policy: DialPolicy = field(default_factory=DialPolicy)
    path: str = "<memory>"

    # ---------------------------------------------------------------- parsing
    @classmethod
    def load(cls, path: str) -> "Credentials":
        """Read and parse ``path``; raises :class:`CredentialsError` (also for
        a file that cannot be read)."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsError(path, 0, f"cannot read: {exc}") from exc
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str = "<memory>") -> "Credentials":
        """Parse the text of a credentials file; raises :class:`CredentialsError`."""
        agents: List[AgentCredential] = []
        users: List[UserCredential] = []
        policy_lines: List[Any] = []
        seen: Dict[bytes, int] = {}
        names: Dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            words = raw.split("#", 1)[0].split()
            if not words:
                continue
            try:
                directive, rest = words[0], words[1:]
                if directive == "agent":
                    entry: Any = _agent(rest, number)
                    agents.append(entry)
                elif directive == "user":
                    entry = _user(rest, number)
                    if entry.name in names:
                        raise ValueError(f"user {entry.name!r} already defined on line {names[entry.name]}")
                    names[entry.name] = number
                    users.append(entry)
                elif directive == "policy":
                    policy_lines.append(parse_policy_words(rest, number))
                    continue
                else:
                    raise ValueError(f"unknown directive {directive!r} (agent, user, policy)")
                if entry.digest in seen:
                    raise ValueError(f"the same secret is already used on line {seen[entry.digest]}")
                seen[entry.digest] = number
            except ValueError as exc:
                raise CredentialsError(path, number, str(exc)) from None
        return cls(tuple(agents), tuple(users), DialPolicy(tuple(policy_lines)), path)

    # --------------------------------------------------------- authentication
    def authenticate_agent(
        self, secret: Optional[str], client_key: str, now: Optional[float] = None
    ) -> AgentCredential:
        """The agent entry allowing ``secret`` to claim ``client_key``. Raises
        :class:`~remotedialer.errors.AuthenticationError` (missing, unknown or
        expired secret) or :class:`~remotedialer.errors.ForbiddenError` (the
        secret is for other keys)."""
        if not secret:
            raise AuthenticationError("missing secret", client_key)
        entry = _find(self.agents, secret)
        if entry is None:
            raise AuthenticationError("unknown secret", client_key)
        _check_expiry(entry.expires, now, client_key)
        if not entry.may_claim(client_key):
            raise ForbiddenError(f"secret of line {entry.line} may not claim this client key", client_key)
        return entry

    def authenticate_user(self, secret: Optional[str], now: Optional[float] = None) -> UserCredential:
        """The user whose secret is ``secret``; raises
        :class:`~remotedialer.errors.AuthenticationError` (missing, unknown or expired)."""
        if not secret:
            raise AuthenticationError("missing secret")
        user = _find(self.users, secret)
        if user is None:
            raise AuthenticationError("unknown secret")
        _check_expiry(user.expires, now, user.name)
        return user

    def authorize_user(
        self, secret: Optional[str], client_key: str, now: Optional[float] = None
    ) -> UserCredential:
        """The user of ``secret``, if they may reach agent ``client_key``:
        raises :class:`~remotedialer.errors.AuthenticationError` or
        :class:`~remotedialer.errors.ForbiddenError`."""
        try:
            user = self.authenticate_user(secret, now)
        except AuthenticationError as exc:
            raise AuthenticationError(exc.reason, client_key) from None
        if not user.may_reach(client_key):
            raise ForbiddenError(f"user {user.name!r} may not reach this agent", client_key)
        return user

    def authorize_admin(self, secret: Optional[str], now: Optional[float] = None) -> UserCredential:
        """The user of ``secret`` if they have the admin role; raises
        :class:`~remotedialer.errors.AuthenticationError` or
        :class:`~remotedialer.errors.ForbiddenError`."""
        user = self.authenticate_user(secret, now)
        if not user.is_admin:
            raise ForbiddenError(f"user {user.name!r} is not an admin", user.name)
        return user

    def summary(self) -> str:
        """``N agents, N users (N admins), N policies`` for a log line."""
        admins = sum(1 for user in self.users if user.is_admin)
        return (f"{len(self.agents)} agent secrets, {len(self.users)} users ({admins} admins), "
                f"{len(self.policy.rules)} policy lines")


def _options(words: Sequence[str], flags: Sequence[str], valued: Sequence[str]) -> Dict[str, str]:
    found: Dict[str, str] = {}
    for word in words:
        name, equals, value = word.partition("=")
        if (name in flags and not equals) or (name in valued and equals and value):
            if name in found:
                raise ValueError(f"{name} given twice")
            found[name] = value
        else:
            known = ", ".join([*flags, *(f"{v}=..." for v in valued)])
            raise ValueError(f"unknown option {word!r} (known: {known})")
    return found


def _agent(words: Sequence[str], line: int) -> AgentCredential:
    if len(words) < 2:
        raise ValueError("usage: agent <sha256:hash> <client-key-glob>[,...] [expires=TIME]")
    options = _options(words[2:], (), ("expires",))
    expires = _parse_expiry(options["expires"]) if "expires" in options else None
    patterns = _parse_globs(words[1])
    if not patterns:
        raise ValueError("an agent secret needs at least one client key")
    return AgentCredential(_parse_hash(words[0]), patterns, expires, line)


def _user(words: Sequence[str], line: int) -> UserCredential:
    if len(words) < 3:
        raise ValueError("usage: user <name> <sha256:hash> <agent-glob>[,...]|- [admin] [expires=TIME]")
    options = _options(words[3:], ("admin",), ("expires",))
    expires = _parse_expiry(options["expires"]) if "expires" in options else None
    return UserCredential(words[0], _parse_hash(words[1]), _parse_globs(words[2]),
                          "admin" in options, expires, line)


ReloadListener = Callable[[bool], None]
"""Called after every reload attempt: ``True`` if a new file took effect."""


class CredentialStore:
    """The credentials in force, from a file, swapped whole on reload.

    Thread-safe: :attr:`current` is a single attribute read; reloads are
    serialized. :meth:`start_watching` starts a thread that reloads when the
    file changes (checked every ``interval`` seconds) or when
    :meth:`request_reload` is called, which the SIGHUP handler of
    :meth:`install_sighup` does. ``on_reload`` hears each attempt (metrics).
    """

    def __init__(self, credentials: Credentials, on_reload: Optional[ReloadListener] = None) -> None:
        self._current = credentials  # replaced whole; readers take one reference
        self.path = credentials.path
        self.on_reload = on_reload
        self._reload_lock = threading.Lock()  # serializes reloads and guards _stamp
        self._stamp = _file_stamp(self.path)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def load(cls, path: str, on_reload: Optional[ReloadListener] = None) -> "CredentialStore":
        """A store for ``path``; raises :class:`CredentialsError` when it does not parse."""
        return cls(Credentials.load(path), on_reload)

    def __repr__(self) -> str:
        return f"<CredentialStore {self.path!r}: {self._current.summary()}>"

    @property
    def current(self) -> Credentials:
        """The credentials in force."""
        return self._current

    # ------------------------------------------------------------- reloading
    def reload(self) -> bool:
        """Read the file again: on success it takes effect for the next
        handshake and dial (open tunnels stay); on failure the last good
        credentials stay and the reason is logged. Returns whether it took."""
        with self._reload_lock:
            self._stamp = _file_stamp(self.path)
            try:
                fresh = Credentials.load(self.path)
            except CredentialsError as exc:
                log.error("credentials not reloaded, keeping the last good ones: %s", exc)
                ok = False
            else:
                self._current = fresh
                log.info("credentials reloaded from %s: %s", self.path, fresh.summary())
                ok = True
        if self.on_reload is not None:
            try:
                self.on_reload(ok)
            except Exception:
                log.exception("credentials reload listener failed")
        return ok

    def request_reload(self) -> None:
        """Ask the watching thread to reload now (safe in a signal handler)."""
        self._wake.set()

    def changed(self) -> bool:
        """Whether the file's size, time or identity changed since the last (re)load."""
        with self._reload_lock:
            return _file_stamp(self.path) != self._stamp

    def start_watching(self, interval: float = 1.0) -> None:
        """Start the thread that reloads on a change of the file and on
        :meth:`request_reload`. Idempotent."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(interval,),
                                        name="remotedialer-credentials", daemon=True)
        self._thread.start()

    def stop_watching(self, timeout: float = 5.0) -> None:
        """Stop the watching thread and wait (at most ``timeout``) for it."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout)

    def _watch(self, interval: float) -> None:
        while not self._stop.is_set():
            requested = self._wake.wait(interval)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                if requested or self.changed():
                    self.reload()
            except Exception:  # pragma: no cover - reload logs its own failures
                log.exception("credentials watcher failed; still watching")

    def install_sighup(self) -> bool:
        """Reload on SIGHUP (through the watching thread, which must be
        started). Only from the main thread; returns whether it installed."""
        if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
            return False

        def on_sighup(signum: int, frame: Any) -> None:
            self.request_reload()

        signal.signal(signal.SIGHUP, on_sighup)
        return True

    # ------------------------------------------------ the current credentials
    def authenticate_agent(self, secret: Optional[str], client_key: str) -> AgentCredential:
        """:meth:`Credentials.authenticate_agent` of the credentials in force."""
        return self._current.authenticate_agent(secret, client_key)

    def authenticate_user(self, secret: Optional[str]) -> UserCredential:
        """:meth:`Credentials.authenticate_user` of the credentials in force."""
        return self._current.authenticate_user(secret)

    def authorize_user(self, secret: Optional[str], client_key: str) -> UserCredential:
        """:meth:`Credentials.authorize_user` of the credentials in force."""
        return self._current.authorize_user(secret, client_key)

    def authorize_admin(self, secret: Optional[str]) -> UserCredential:
        """:meth:`Credentials.authorize_admin` of the credentials in force."""
        return self._current.authorize_admin(secret)

    def dial_policy(self) -> DialPolicy:
        """The dial policy in force (a :data:`~remotedialer.server.policy.PolicySource`)."""
        return self._current.policy

    def agent_authorizer(self, request: Any) -> Tuple[str, bool]:
        """A :data:`~remotedialer.server.Authorizer`: the client key is the
        ``X-Tunnel-ID`` header, the secret the ``Authorization: Bearer``
        token. Raises :class:`~remotedialer.errors.AuthenticationError` (401)
        or :class:`~remotedialer.errors.ForbiddenError` (403); a missing key
        raises ``ValueError`` (400).

        An agent that presented a client certificate the TLS server verified
        (mTLS: the server trusts a client CA) needs no secret: the
        certificate's name (its first DNS subject alternative name, else its
        common name) is the client key; an ``X-Tunnel-ID`` naming another
        key than the certificate's names is refused (403)."""
        headers: Mapping[str, str] = request.headers
        client_key = headers.get("X-Tunnel-ID", "")
        names = certificate_names(tls_peer_certificate(request.environ))
        if names:
            claimed = client_key or names[0]
            if claimed not in names:
                raise ForbiddenError(f"the client certificate is for {', '.join(names)}", claimed)
            return claimed, True
        if not client_key:
            raise ValueError("missing X-Tunnel-ID header (the client key)")
        self.authenticate_agent(bearer_token(headers.get("Authorization")), client_key)
        return client_key, True


def tls_peer_certificate(environ: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The verified client certificate of a WSGI request's TLS connection
    (``SSLSocket.getpeercert()``), or ``None``: plain TCP, no certificate,
    or one the server did not verify."""
    try:
        sock, _kind = socket_from_environ(environ)
    except UnsupportedServerError:
        return None
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        cert = getpeercert()
    except (OSError, ValueError):
        return None
    return cert or None


def certificate_names(cert: Optional[Mapping[str, Any]]) -> List[str]:
    """The names of a certificate (``getpeercert()`` form): its DNS subject
    alternative names, then its common name; empty for ``None``."""
    if not cert:
        return []
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value not in names:
                names.append(value)
    return names


def _file_stamp(path: str) -> Optional[Tuple[int, int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
