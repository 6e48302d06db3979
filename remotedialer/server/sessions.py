"""The server's table of live sessions, by client key.

Several sessions may share a client key (a client that reconnected before its
old tunnel was noticed dead, or several replicas of one agent); dials use the
first one registered that is still open. A session leaves the table as soon as
it ends. Listeners hear about every addition and removal, in order, which is
what peering needs to send ADD_CLIENT / REMOVE_CLIENT.

Locks, in the order they may nest:

* ``_notify_lock`` serializes listener calls (and listener registration), so
  each listener sees every session added before it is removed;
* ``_lock`` guards the table; never held while calling out.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type

from ..connection import TunnelConnection
from ..errors import LimitExceededError, TunnelClosedError
from ..resumable import ResumableSession
from ..resume import token_digest
from ..session import Session

__all__ = ["SessionManager", "SessionListener", "ResumeTokens", "dial_first"]

log = logging.getLogger(__name__)

SessionListener = Callable[[bool, str, Session], None]
"""``(added, client_key, session)``: called after a session was added to
(``added`` true) or removed from the table. Runs on the thread that changed
the table, one call at a time; it must be quick (hand slow work, such as a
write that may block, to another thread) and must not raise."""


def dial_first(
    sessions: Iterable[Session],
    proto: str,
    address: str,
    timeout: Optional[float],
    skip: Tuple[Type[BaseException], ...] = (TunnelClosedError,),
    resumed: bool = False,
) -> Optional[TunnelConnection]:
    """Dial through the first of ``sessions`` that takes the CONNECT, in
    order. A closed or suspended session, or one whose dial raises one of
    ``skip`` (it died under us), is passed over; ``None`` when none took it.

    With ``resumed``, the suspended ones only (resumable sessions that lost
    their WebSocket, which a dial tries last): wait for each in turn to
    resume, within ``timeout`` in all (``None``: until it resumes or its
    resume window passes), and dial through the first that does; the
    connection's timeout starts as ``timeout`` all the same."""
    deadline = None if timeout is None or not resumed else time.monotonic() + timeout
    for session in sessions:
        if resumed:
            if session.accepting_dials or session.closed:
                continue  # tried before, or ended
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not session.wait_accepting_dials(remaining):
                continue
        elif not session.accepting_dials:
            continue
        try:
            return session.dial(proto, address, timeout)
        except skip:
            continue
    return None


class SessionManager:
    """Live sessions by client key; thread-safe.

    ``max_sessions_per_key`` bounds how many sessions one client key may hold
    at once (:meth:`add` raises :class:`~remotedialer.errors.LimitExceededError`
    beyond it).
    """

    def __init__(self, max_sessions_per_key: int = 64) -> None:
        self.max_sessions_per_key = max_sessions_per_key
        self._lock = threading.Lock()
        self._notify_lock = threading.RLock()
        self._sessions: Dict[str, List[Session]] = {}  # guarded by _lock
        self._count = 0  # sessions in _sessions, guarded by _lock
        self._listeners: List[SessionListener] = []  # guarded by _notify_lock

    def __repr__(self) -> str:
        with self._lock:
            counts = {key: len(sessions) for key, sessions in self._sessions.items()}
        return f"<SessionManager {counts}>"

    # ---------------------------------------------------------------- changes
    def add(self, client_key: str, session: Session) -> None:
        """Register ``session`` under ``client_key``; it is removed again
        when it ends (at once if it already has). Raises
        :class:`~remotedialer.errors.LimitExceededError` if the key already
        holds ``max_sessions_per_key`` sessions."""
        with self._lock:
            sessions = self._sessions.setdefault(client_key, [])
            if len(sessions) >= self.max_sessions_per_key:
                if not sessions:  # pragma: no cover - max is at least 1
                    del self._sessions[client_key]
                raise LimitExceededError(
                    f"client {client_key!r} already holds {len(sessions)} sessions"
                )
            sessions.append(session)
            self._count += 1
        log.debug("session added: %s", session)
        self._notify(True, client_key, session)
        def on_close(ended: Session) -> None:
            self.remove(client_key, ended)

        session.add_close_callback(on_close)

    def remove(self, client_key: str, session: Session) -> bool:
        """Drop ``session`` from ``client_key``; False if it was not there."""
        with self._lock:
            sessions = self._sessions.get(client_key)
            if not sessions or session not in sessions:
                return False
            sessions.remove(session)
            self._count -= 1
            if not sessions:
                del self._sessions[client_key]
        log.debug("session removed: %s", session)
        self._notify(False, client_key, session)
        return True

    # ---------------------------------------------------------------- queries
    def first(self, client_key: str) -> Optional[Session]:
        """The first registered session of ``client_key`` that is still open."""
        for session in self.sessions(client_key):
            if not session.closed:
                return session
        return None

    def sessions(self, client_key: str) -> List[Session]:
        """The sessions of ``client_key``, in registration order (a copy)."""
        with self._lock:
            return list(self._sessions.get(client_key, ()))

    def has_session(self, client_key: str) -> bool:
        """Whether ``client_key`` has an open session."""
        return self.first(client_key) is not None

    def client_keys(self) -> List[str]:
        """The client keys with at least one session, sorted."""
        with self._lock:
            return sorted(self._sessions)

    def all_sessions(self) -> List[Session]:
        """Every registered session."""
        with self._lock:
            return [s for sessions in self._sessions.values() for s in sessions]

    def __len__(self) -> int:
        """Sessions registered, all keys together (kept as a count: the
        graceful shutdown asks after every removal, and a sum over the keys
        made closing 10,000 tunnels quadratic)."""
        with self._lock:
            return self._count

    # -------------------------------------------------------------- listeners
    def add_listener(self, listener: SessionListener, replay: bool = False) -> None:
        """Call ``listener`` on every later change. With ``replay``, first
        call it as added for every session registered now; no change can slip
        between the replay and the registration."""
        with self._notify_lock:
            if replay:
                with self._lock:
                    current = [(key, s) for key, sessions in self._sessions.items() for s in sessions]
                for key, session in current:
                    self._call(listener, True, key, session)
            self._listeners.append(listener)

    def remove_listener(self, listener: SessionListener) -> None:
        """Stop calling ``listener``."""
        with self._notify_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _notify(self, added: bool, client_key: str, session: Session) -> None:
        with self._notify_lock:
            for listener in list(self._listeners):
                self._call(listener, added, client_key, session)

    @staticmethod
    def _call(listener: SessionListener, added: bool, client_key: str, session: Session) -> None:
        try:
            listener(added, client_key, session)
        except Exception:
            log.exception("session listener failed")


class ResumeTokens:
    """The resumption tokens of a server's sessions (docs/protocol.rst,
    "Security"): only their SHA-256 is kept, each is good for one reattach,
    by a request authorized for the same client key. Thread-safe; ``_lock``
    guards both tables and is never held while calling out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: Dict[bytes, ResumableSession] = {}  # digest -> session
        self._digests: Dict[ResumableSession, bytes] = {}  # session -> its current digest

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def issue(self, session: ResumableSession, token: str) -> None:
        """Make ``token`` the one that reattaches ``session`` (voiding the
        previous one); forgotten when the session ends."""
        digest = token_digest(token)
        with self._lock:
            first = session not in self._digests
            old = self._digests.get(session)
            if old is not None:
                self._sessions.pop(old, None)
            self._sessions[digest] = session
            self._digests[session] = digest
        if first:
            session.add_close_callback(self._forget)

    def take(self, client_key: str, token: str) -> Optional[ResumableSession]:
        """The open session ``token`` reattaches, if it belongs to
        ``client_key``; the token is void from then on. ``None`` otherwise."""
        digest = token_digest(token)
        with self._lock:
            session = self._sessions.get(digest)
            if session is None or session.client_key != client_key or session.closed:
                return None
            del self._sessions[digest]
            return session

    def _forget(self, session: Session) -> None:
        with self._lock:
            digest = self._digests.pop(session, None)  # type: ignore[call-overload]
            if digest is not None:
                self._sessions.pop(digest, None)
