"""Sans-IO state of the resumption extension (docs/protocol.rst, "Resumption extension").

A session that negotiated resumption keeps, per connection, what it sent
until the peer acknowledged it, and counts what it received. When the
WebSocket is lost, both sides exchange REATTACH messages on the new one and
each sends what the other is missing. This module holds that bookkeeping and
the encodings; it has no threads, sockets or clocks, and is not thread-safe:
its owner (the session) guards a :class:`ResumeLedger` with one of its locks.

* :func:`encode_ack` / :func:`decode_ack`, :func:`encode_reattach` /
  :func:`decode_reattach`: payloads of the two message types;
* :class:`ResumeLedger`: the per-session table of per-connection counters
  and retransmit buffers, with the caps, and :meth:`ResumeLedger.plan_reattach`
  which turns the peer's REATTACH into the list of things to send or end;
* :func:`new_token` / :func:`token_digest`: the resumption tokens.
"""

from __future__ import annotations

import base64
import collections
import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import ProtocolError
from .protocol import Bytes, decode_varint, encode_varint

__all__ = [
    "ResumeMessageType",
    "ReattachEntry",
    "ReattachPlan",
    "ResumeLedger",
    "encode_ack",
    "decode_ack",
    "encode_reattach",
    "decode_reattach",
    "new_token",
    "token_digest",
    "tokens_match",
    "RESUME_HEADER",
    "TOKEN_HEADER",
    "WINDOW_HEADER",
    "RESUMED_HEADER",
    "RESUME_VERSION",
    "RESET_TEXT",
]

RESUME_HEADER = "X-Remotedialer-Resume"
"""Request header offering the extension; the ``101`` repeats it when accepted."""
TOKEN_HEADER = "X-Remotedialer-Resume-Token"
"""The token: in the ``101`` (a new one each time) and in a reattaching request."""
WINDOW_HEADER = "X-Remotedialer-Resume-Window"
"""In the ``101``: the server's resume window in seconds."""
RESUMED_HEADER = "X-Remotedialer-Resumed"
"""In the ``101`` answering a reattach: present when the session was found."""
RESUME_VERSION = "1"
"""The version of the extension this module speaks."""

ACK_FRACTION = 8
"""A connection is acknowledged once an eighth of its cap arrived since its
last ACK (the sender then never waits at the cap while the loopback's
socket buffers hold a few MiB in flight), a session once an eighth of the
session cap arrived across its connections."""

RESET_TEXT = "connection reset"
"""ERROR text for a connection the peer has and we lost across a reattach."""

_FLAG_CLOSED = 1
_FLAG_PAUSING = 2
_FLAG_DIALED = 4
_KNOWN_FLAGS = _FLAG_CLOSED | _FLAG_PAUSING | _FLAG_DIALED


class ResumeMessageType(enum.IntEnum):
    """Message types of the extension, sent only on a session that negotiated it."""

    ACK = 64
    REATTACH = 65


# ------------------------------------------------------------------ encodings
def encode_ack(received: int) -> bytes:
    """ACK payload: the total DATA bytes received on the connection."""
    return encode_varint(received)


def _decode_count(payload: Bytes, offset: int) -> Tuple[int, int]:
    value, offset = decode_varint(payload, offset)
    if value < 0:
        raise ProtocolError(f"negative byte count {value}")
    return value, offset


def decode_ack(payload: Bytes) -> int:
    """The count of an ACK payload; raises :class:`ProtocolError` if malformed."""
    value, offset = _decode_count(payload, 0)
    if offset != len(payload):
        raise ProtocolError("trailing bytes after ACK count")
    return value


@dataclass(frozen=True)
class ReattachEntry:
    """One connection in a REATTACH: what the sender has received on it,
    whether it is closed on the sender's side, whether the sender is pausing
    the peer on it, and whether the sender dialed it."""

    conn_id: int
    received: int
    closed: bool = False
    pausing: bool = False
    dialed: bool = False


def encode_reattach(entries: Iterable[ReattachEntry]) -> bytes:
    """REATTACH payload: ``conn id, received, flags`` varints per entry."""
    parts: List[bytes] = []
    for entry in entries:
        flags = (
            (_FLAG_CLOSED if entry.closed else 0)
            | (_FLAG_PAUSING if entry.pausing else 0)
            | (_FLAG_DIALED if entry.dialed else 0)
        )
        parts += (encode_varint(entry.conn_id), encode_varint(entry.received), encode_varint(flags))
    return b"".join(parts)


def decode_reattach(payload: Bytes) -> List[ReattachEntry]:
    """Decode a REATTACH payload; raises :class:`ProtocolError` for a payload
    that is not whole entries, a negative count, unknown flags or an id twice."""
    entries: List[ReattachEntry] = []
    seen = set()
    offset = 0
    while offset < len(payload):
        conn_id, offset = decode_varint(payload, offset)
        received, offset = _decode_count(payload, offset)
        flags, offset = decode_varint(payload, offset)
        if flags & ~_KNOWN_FLAGS or flags < 0:
            raise ProtocolError(f"unknown REATTACH flags {flags}")
        if conn_id in seen:
            raise ProtocolError(f"connection {conn_id} listed twice in REATTACH")
        seen.add(conn_id)
        entries.append(
            ReattachEntry(
                conn_id, received, bool(flags & _FLAG_CLOSED), bool(flags & _FLAG_PAUSING),
                bool(flags & _FLAG_DIALED),
            )
        )
    return entries


# --------------------------------------------------------------------- tokens
def new_token() -> str:
    """A fresh resumption token: 32 random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def token_digest(token: str) -> bytes:
    """What a server keeps of a token: its SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


def tokens_match(digest: bytes, token: str) -> bool:
    """Whether ``token`` is the one whose digest is ``digest`` (constant time)."""
    return hmac.compare_digest(digest, token_digest(token))


# --------------------------------------------------------------------- ledger
@dataclass
class _Entry:
    """Counters and retransmit buffer of one connection."""

    dialed_here: bool
    connect: bytes = b""  # our CONNECT payload, to send again if it was lost
    sent: int = 0  # DATA payload bytes sent
    acked: int = 0  # of those, how many the peer said it received
    received: int = 0  # DATA payload bytes received
    ack_sent: int = 0  # the count in our last ACK (or REATTACH)
    peer_knows: bool = False  # the peer has shown it has the connection
    final: Optional[str] = None  # our ERROR text, once we closed it
    # What is kept for retransmission, oldest first: (end, message) per DATA
    # write, where ``end`` is the stream offset just past its payload and the
    # payload is the last ``end - start`` bytes of ``message`` (``start``:
    # the previous item's end; for the first, what is owed starts at
    # ``acked``). Messages are kept whole (the header too), as they were
    # sent: no slice per write.
    chunks: Deque[Tuple[int, Bytes]] = field(default_factory=collections.deque)

    @property
    def unacked(self) -> int:
        return self.sent - self.acked


@dataclass
class ReattachPlan:
    """What to do after the peer's REATTACH, in this order: send CONNECT again
    for ``redial`` (connection id, CONNECT payload), send ``resend``
    (connection id, DATA payload), send ``errors`` (connection id, ERROR text),
    end ``reset`` locally with an ``ECONNRESET``-shaped error, and set each
    connection's "the peer paused us" flag from ``peer_pausing``."""

    redial: List[Tuple[int, bytes]] = field(default_factory=list)
    resend: List[Tuple[int, Bytes]] = field(default_factory=list)
    errors: List[Tuple[int, str]] = field(default_factory=list)
    reset: List[int] = field(default_factory=list)
    peer_pausing: Dict[int, bool] = field(default_factory=dict)

    @property
    def resent_bytes(self) -> int:
        """DATA payload bytes the plan sends again."""
        return sum(len(payload) for _conn_id, payload in self.resend)


class ResumeLedger:
    """Per-connection byte counts and retransmit buffers of one session.

    The sender side: :meth:`record_sent` keeps each DATA payload until
    :meth:`acknowledge` covers it; :meth:`has_room` says whether a writer may
    send ``size`` more bytes within the per-connection and per-session caps
    (else it waits for an ACK, as for a PAUSE). The receiver side:
    :meth:`record_received` counts DATA and says when an ACK is due,
    :meth:`due_acks` collects the ones a keepalive tick should send.

    Closing: :meth:`close` (we sent ERROR) keeps a *tombstone* with the
    unacknowledged bytes and the ERROR text; :meth:`peer_closed` (an ERROR
    arrived) drops a tombstone, the peer confirming our close, or ends an
    open connection and keeps a small *ended* record of it, so that a
    REATTACH can tell the peer we had its ERROR even if our echo was lost.
    Both are bounded by ``max_tombstones``, oldest dropped first.
    """

    def __init__(
        self,
        connection_cap: int = 4 * 1024 * 1024,
        session_cap: int = 64 * 1024 * 1024,
        max_tombstones: int = 4096,
    ) -> None:
        if not 0 < connection_cap <= session_cap:
            raise ValueError("need 0 < connection_cap <= session_cap")
        self.connection_cap = connection_cap
        self.session_cap = session_cap
        self.max_tombstones = max_tombstones
        #: Received bytes of one connection after which it is acknowledged
        #: without waiting for a tick.
        self.ack_threshold = max(1, connection_cap // ACK_FRACTION)
        #: Received bytes of the whole session, not yet acknowledged, after
        #: which every connection is (:meth:`acks_due`): many connections
        #: that each stay under ``ack_threshold`` do not fill the peer's
        #: session cap waiting for a tick.
        self.session_ack_threshold = max(1, session_cap // ACK_FRACTION)
        self._received_unacked = 0  # all connections, since the last ACK of each
        self._entries: Dict[int, _Entry] = {}  # open or tombstoned connections
        self._tombstones: "collections.OrderedDict[int, None]" = collections.OrderedDict()
        # connections the peer closed: id -> (bytes received, dialed here)
        self._ended: "collections.OrderedDict[int, Tuple[int, bool]]" = collections.OrderedDict()
        self.retained = 0  #: bytes kept for retransmission, all connections

    def __contains__(self, conn_id: int) -> bool:
        return conn_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------ lifecycle
    def add(self, conn_id: int, dialed_here: bool, connect: bytes = b"") -> None:
        """Start counting for a new connection: one we dialed (``connect``
        is the payload of its CONNECT) or one the peer dialed."""
        if conn_id in self._entries:
            raise ValueError(f"connection {conn_id} already in the ledger")
        self._ended.pop(conn_id, None)
        self._entries[conn_id] = _Entry(dialed_here, connect, peer_knows=not dialed_here)

    def close(self, conn_id: int, text: str) -> None:
        """We sent ERROR ``text``: keep a tombstone until the peer confirms."""
        entry = self._entries.get(conn_id)
        if entry is None or entry.final is not None:
            return
        entry.final = text
        self._tombstones[conn_id] = None
        while len(self._tombstones) > self.max_tombstones:
            oldest, _ = self._tombstones.popitem(last=False)
            self._drop(oldest)

    def is_tombstone(self, conn_id: int) -> bool:
        """Whether we closed ``conn_id`` and still remember it."""
        return conn_id in self._tombstones

    def peer_closed(self, conn_id: int) -> bool:
        """An ERROR for ``conn_id`` arrived. Returns True if the connection
        was open here: it ended, and the peer is owed an ERROR echo. For a
        tombstone (the peer's echo of our close) or an unknown id, False."""
        entry = self._entries.get(conn_id)
        if entry is None:
            return False
        if entry.final is not None:
            self._forget(conn_id)
            return False
        self._forget(conn_id)
        self._ended[conn_id] = (entry.received, entry.dialed_here)
        while len(self._ended) > self.max_tombstones:
            self._ended.popitem(last=False)
        return True

    def forget(self, conn_id: int) -> None:
        """Drop a connection and whatever it kept, without a record (the
        connection never reached the peer, or the session is ending)."""
        self._forget(conn_id)

    def _forget(self, conn_id: int) -> None:
        self._tombstones.pop(conn_id, None)
        self._drop(conn_id)

    def _drop(self, conn_id: int) -> None:
        entry = self._entries.pop(conn_id, None)
        if entry is not None:
            self.retained -= entry.unacked

    # --------------------------------------------------------------- sending
    def has_room(self, conn_id: int, size: int) -> bool:
        """Whether ``size`` more bytes may be sent on ``conn_id`` now: within
        the connection's cap and the session's. A buffer that keeps nothing
        takes one message of any size, so that it cannot wait for ever (an
        empty connection buffer, as to the connection cap; an empty session,
        as to the session cap)."""
        entry = self._entries.get(conn_id)
        if entry is None:
            return True
        return self._fits(entry.sent - entry.acked, size)

    def _fits(self, unacked: int, size: int) -> bool:
        if unacked and unacked + size > self.connection_cap:
            return False
        return not self.retained or self.retained + size <= self.session_cap

    def record_if_room(self, conn_id: int, message: Bytes, size: Optional[int] = None) -> bool:
        """:meth:`has_room` and :meth:`record_sent` in one step (a writer's
        per-message path): False, and nothing recorded, if there is no room."""
        entry = self._entries.get(conn_id)
        if entry is None:
            return True
        if size is None:
            size = len(message)
        sent, retained = entry.sent, self.retained
        unacked = sent - entry.acked
        if (unacked and unacked + size > self.connection_cap) or (
            retained and retained + size > self.session_cap
        ):  # not _fits(): a call less on the per-message path
            return False
        if size:
            sent += size
            entry.sent = sent
            entry.chunks.append((sent, message))
            self.retained += size
        return True

    def unacked(self, conn_id: int) -> int:
        """Bytes of ``conn_id`` sent and not yet acknowledged."""
        entry = self._entries.get(conn_id)
        return 0 if entry is None else entry.unacked

    def record_sent(self, conn_id: int, message: Bytes, size: Optional[int] = None) -> None:
        """A DATA payload went out on ``conn_id``: ``message`` is the payload,
        or with ``size`` a buffer whose last ``size`` bytes are (the encoded
        DATA message). It is kept as it is: it must not change afterwards
        (pass ``bytes`` or a view of an immutable buffer)."""
        entry = self._entries.get(conn_id)
        if size is None:
            size = len(message)
        if entry is None or not size:
            return
        entry.sent += size
        entry.chunks.append((entry.sent, message))
        self.retained += size

    def acknowledge(self, conn_id: int, received: int, exact: bool = False) -> int:
        """The peer has ``received`` bytes of ``conn_id``: free them; return
        how many bytes were freed. Raises :class:`ProtocolError` for a count
        beyond what was sent. A count below an earlier one is a late ACK and
        is ignored, unless ``exact`` (a REATTACH count, which must not go
        backwards). Whole kept messages are dropped; one the count ends
        inside stays until a later count covers it (the resend starts at
        the count)."""
        entry = self._entries.get(conn_id)
        if entry is None:
            return 0
        if received > entry.sent:
            raise ProtocolError(
                f"peer acknowledged {received} bytes of connection {conn_id}, {entry.sent} sent"
            )
        if received < entry.acked:
            if not exact:
                return 0
            raise ProtocolError(f"acknowledgement of connection {conn_id} went backwards")
        entry.peer_knows = True
        freed = received - entry.acked
        entry.acked = received
        self.retained -= freed
        chunks = entry.chunks
        if received == entry.sent:
            chunks.clear()  # all of it: the common case, in one step
        else:
            while chunks and chunks[0][0] <= received:
                chunks.popleft()
        return freed

    # ------------------------------------------------------------- receiving
    def record_received(self, conn_id: int, size: int) -> Optional[int]:
        """``size`` DATA bytes arrived on ``conn_id``; returns the count to
        send in an ACK now (a quarter of the cap arrived unacknowledged), or
        ``None``."""
        entry = self._entries.get(conn_id)
        if entry is None:
            return None
        entry.peer_knows = True
        received = entry.received + size
        entry.received = received
        owed = received - entry.ack_sent
        if owed >= self.ack_threshold:
            entry.ack_sent = received
            self._received_unacked -= owed - size
            return received
        self._received_unacked += size
        return None

    @property
    def acks_due(self) -> bool:
        """Whether the session's received bytes not yet acknowledged passed
        ``session_ack_threshold``: :meth:`due_acks` should go out now."""
        return self._received_unacked >= self.session_ack_threshold

    def due_acks(self) -> List[Tuple[int, int]]:
        """``(conn id, received)`` for every connection with bytes not yet
        acknowledged, marked as acknowledged (a keepalive tick sends them,
        and the reader once :attr:`acks_due`)."""
        self._received_unacked = 0
        due = []
        for conn_id, entry in self._entries.items():
            if entry.received > entry.ack_sent and entry.final is None:
                entry.ack_sent = entry.received
                due.append((conn_id, entry.received))
        return due

    # ------------------------------------------------------------- reattach
    def local_state(self, pausing: Iterable[int] = ()) -> List[ReattachEntry]:
        """Our REATTACH entries; ``pausing`` holds the ids of connections on
        which we have asked the peer to pause. Marks every received byte as
        acknowledged (the REATTACH tells the peer)."""
        pausing = set(pausing)
        self._received_unacked = 0
        state = []
        for conn_id, entry in self._entries.items():
            entry.ack_sent = entry.received
            state.append(
                ReattachEntry(
                    conn_id, entry.received, entry.final is not None, conn_id in pausing,
                    entry.dialed_here,
                )
            )
        for conn_id, (received, dialed_here) in self._ended.items():
            state.append(ReattachEntry(conn_id, received, closed=True, dialed=dialed_here))
        return state

    def plan_reattach(self, peer_state: Sequence[ReattachEntry]) -> ReattachPlan:
        """Apply the peer's REATTACH and return what to send and end (see
        docs/protocol.rst). Raises :class:`ProtocolError` if the peer claims
        more than we sent or less than it acknowledged."""
        plan = ReattachPlan()
        peer = {entry.conn_id: entry for entry in peer_state}
        for conn_id in [c for c in self._ended if c not in peer]:
            del self._ended[conn_id]  # the peer has dropped its tombstone
        for conn_id in list(self._entries):
            entry = self._entries[conn_id]
            theirs = peer.get(conn_id)
            if theirs is None:
                if entry.dialed_here and not entry.peer_knows:
                    plan.redial.append((conn_id, entry.connect))  # the CONNECT was lost
                    plan.resend += self._unacked_chunks(conn_id, entry)
                    if entry.final is not None:
                        plan.errors.append((conn_id, entry.final))
                elif entry.final is None:
                    plan.reset.append(conn_id)  # the peer lost it
                    self._forget(conn_id)
                else:
                    self._forget(conn_id)  # the peer had our ERROR and our echo
                continue
            self.acknowledge(conn_id, theirs.received, exact=True)
            if theirs.closed:
                if entry.final is not None:
                    self._forget(conn_id)  # closed on both sides
                # else: the peer sends what we miss, then its ERROR again
                continue
            plan.peer_pausing[conn_id] = theirs.pausing
            plan.resend += self._unacked_chunks(conn_id, entry)
            if entry.final is not None:
                plan.errors.append((conn_id, entry.final))
        for conn_id, theirs in peer.items():
            known = conn_id in self._entries or conn_id in self._ended
            if not known and not theirs.closed and not theirs.dialed:
                plan.errors.append((conn_id, RESET_TEXT))  # we dropped it
            # dialed by the peer and unknown here: our CONNECT never came;
            # the peer sends it again (or resets it if it heard from us)
        return plan

    @staticmethod
    def _unacked_chunks(conn_id: int, entry: _Entry) -> List[Tuple[int, Bytes]]:
        """The payloads not acknowledged, from ``entry.acked`` on."""
        payloads: List[Tuple[int, Bytes]] = []
        start = entry.acked  # the first one may be acknowledged in part
        for end, message in entry.chunks:
            payloads.append((conn_id, memoryview(message)[len(message) - (end - start) :]))
            start = end
        return payloads

    def sent(self, conn_id: int) -> int:
        """DATA payload bytes sent on ``conn_id`` so far (0 if unknown)."""
        entry = self._entries.get(conn_id)
        return 0 if entry is None else entry.sent

    def received(self, conn_id: int) -> int:
        """DATA payload bytes received on ``conn_id`` so far (0 if unknown)."""
        entry = self._entries.get(conn_id)
        return 0 if entry is None else entry.received
