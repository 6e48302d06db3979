"""HA peering between servers (docs/protocol.rst, "Peering"), wire-compatible with Go.

Each server has a peer id and a token. For every peer it knows, a server keeps
a :class:`PeerLink`: a client-side WebSocket to the peer's connect URL,
authenticated with ``X-API-Tunnel-ID`` / ``X-API-Tunnel-Token`` and kept up
with jittered backoff. Over that link it announces its own client sessions
(ADD_CLIENT at link start and as they come, REMOVE_CLIENT as they go), and it
serves the peer's relayed dials: a CONNECT whose proto is
``clientKey::proto`` is dialed through our own session for ``clientKey`` and
the two connections are piped together.

On the receiving end, :class:`Peering` authenticates peers that connect to
us (:meth:`Peering.authenticate`: the peer table of id -> token), remembers
which client keys each peer session advertised, and :meth:`Peering.dial` uses
that when the server has no session of its own for a key. Both servers add
each other for routing in both directions.
"""

from __future__ import annotations

import hmac
import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Set, Tuple, Type, Union

from ..client import Backoff, TunnelClient
from ..config import DEFAULT_LIMITS, Limits
from ..connection import TunnelConnection
from ..errors import (
    ConnectNotAllowedError,
    DialRefusedError,
    HandshakeError,
    NoSessionError,
    TunnelClosedError,
)
from ..observer import NULL_OBSERVER, Observer
from ..piping import Piper
from ..server.sessions import SessionManager, dial_first
from ..session import Session
from ..thread_pool import ThreadPool

if TYPE_CHECKING:
    from werkzeug.datastructures import Headers

    from ..server.tunnel_server import Server

__all__ = [
    "Peering",
    "PeerLink",
    "PeerSpec",
    "parse_peers",
    "peer_ssl_context",
    "PEER_ID_HEADER",
    "PEER_TOKEN_HEADER",
    "PEER_PROTO_SEPARATOR",
]

log = logging.getLogger(__name__)

PEER_BACKOFF = Backoff(initial=0.5, maximum=5.0)
"""Reconnect delays of peer links: Go retries every 5 s; we start sooner and
never wait longer, so a restarted peer is back in the mesh within seconds."""

PEER_ID_HEADER = "X-API-Tunnel-ID"
"""Header carrying a peer server's id on its peer link."""
PEER_TOKEN_HEADER = "X-API-Tunnel-Token"
"""Header carrying a peer server's token on its peer link."""

PEER_PROTO_SEPARATOR = "::"
"""Separates the client key from the proto in a CONNECT relayed by a peer."""


@dataclass(frozen=True)
class PeerSpec:
    """One peer: its id, the token it presents (and we present to it), its URL."""

    peer_id: str
    token: str
    url: str

    def __repr__(self) -> str:  # never show the token
        return f"PeerSpec(peer_id={self.peer_id!r}, url={self.url!r})"


def parse_peers(text: Optional[str]) -> List[PeerSpec]:
    """Parse ``id:token:url,id:token:url`` (the Go example's ``--peers``).

    The URL may itself contain colons (``ws://host:port/connect``); empty
    entries are ignored. Raises ``ValueError`` for an entry without all three
    parts (the message names the peer id only, never the token).
    """
    specs = []
    for entry in filter(None, (part.strip() for part in (text or "").split(","))):
        parts = entry.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"invalid peer {entry.split(':', 1)[0]!r}: expected id:token:url")
        specs.append(PeerSpec(*parts))
    return specs


def peer_ssl_context(
    ca_file: Optional[str] = None, verify: bool = True
) -> Optional[ssl.SSLContext]:
    """TLS settings for ``wss://`` peer links. Certificates are verified by
    default (Go skips verification); ``ca_file`` trusts a private CA and
    ``verify=False`` opts out explicitly."""
    if verify and ca_file is None:
        return None  # websocket-client's default: verify against the system store
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _LinkClient(TunnelClient):
    """A tunnel client that reports each connection attempt to the observer."""

    def __init__(self, peer_id: str, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._peer_id = peer_id

    def connect_once(self) -> str:
        (self.observer or NULL_OBSERVER).peer_connecting(self._peer_id)
        return super().connect_once()

    def describe_failure(self, error: BaseException) -> str:
        """A refused peer authentication names the peer and the likely cause
        (the accepting side logs which: token mismatch or unknown peer id)."""
        text = super().describe_failure(error)
        if isinstance(error, HandshakeError) and error.status == 401:
            ours = self.headers.get(PEER_ID_HEADER, "")
            return (f"peer {self._peer_id} refused our peer link as {ours}: {text} - its --token differs "
                    f"from ours, or it does not list {ours} among its peers")
        return text


class PeerLink:
    """Our outgoing link to one peer: announces our clients, relays its dials."""

    def __init__(
        self,
        peering: "Peering",
        spec: PeerSpec,
        ssl_context: Optional[ssl.SSLContext],
        backoff: Backoff,
    ) -> None:
        self.peering = peering
        self.spec = spec
        assert peering.peer_id and peering.peer_token
        # (added, client key, session key), a flush marker, or None to stop
        self._announcements: "queue.Queue[Union[None, Tuple[bool, str, int], threading.Event]]"
        self._announcements = queue.Queue()
        self._session: Optional[Session] = None
        self.observer = peering.observer or NULL_OBSERVER
        self.client = _LinkClient(
            spec.peer_id,
            spec.url,
            {PEER_ID_HEADER: peering.peer_id, PEER_TOKEN_HEADER: peering.peer_token},
            connect_handler=peering.handle_connect,
            on_connect=self._on_connect,
            limits=peering.limits,
            backoff=backoff,
            ssl_context=ssl_context,
            observer=peering.observer,
            client_key=spec.peer_id,
            proxy="",  # peers connect directly, whatever HTTP(S)_PROXY says, as Go's peer dialer does
        )
        self._announcer = threading.Thread(
            target=self._announce_loop, name=f"remotedialer-peer-{spec.peer_id}", daemon=True
        )

    def __repr__(self) -> str:
        return f"<PeerLink {self.spec.peer_id} {self.spec.url}>"

    def start(self) -> None:
        self._announcer.start()
        self.client.start()

    def stop(self) -> None:
        self.client.stop(timeout=2)
        self._announcements.put(None)

    def flush_marker(self) -> threading.Event:
        """An event set once every announcement queued so far has been sent
        (or dropped, for a link that is down)."""
        done = threading.Event()
        self._announcements.put(done)
        return done

    @property
    def connected(self) -> bool:
        """Whether the link's WebSocket is up."""
        return self.client.session is not None

    def _on_connect(self, session: Session) -> None:
        """A link came up: announce every client session, now and as they change."""
        log.info("peer link to %s (%s) up", self.spec.peer_id, self.spec.url)
        self._session = session
        self.observer.peer_connected(self.spec.peer_id)
        manager = self.peering.client_sessions

        def listener(added: bool, client_key: str, client_session: Session) -> None:
            self._announcements.put((added, client_key, client_session.session_key))

        manager.add_listener(listener, replay=True)

        def on_close(_ended: Session) -> None:
            manager.remove_listener(listener)
            self.observer.peer_disconnected(self.spec.peer_id)
            log.info("peer link to %s ended: %s", self.spec.peer_id, session.close_reason)

        session.add_close_callback(on_close)

    def _announce_loop(self) -> None:
        """Send ADD/REMOVE_CLIENT in order, off the session manager's thread
        (a slow link must not hold up sessions coming and going)."""
        while True:
            item = self._announcements.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()  # everything queued before the marker went out
                continue
            added, client_key, session_key = item
            session = self._session
            if session is None or session.closed:
                continue  # a new link replays everything anyway
            if added:
                session.send_client_added(client_key, session_key)
            else:
                session.send_client_removed(client_key, session_key)


LocalDial = Callable[[str, str, str, Optional[float], Tuple[Type[BaseException], ...]],
                     Optional[TunnelConnection]]
"""``dial(client_key, proto, address, timeout, skip)`` through this server's
own sessions of ``client_key``; ``None`` if none took it; may raise
:class:`~remotedialer.errors.DialRefusedError`."""


class Peering:
    """The peering state of one server: its
    :class:`~remotedialer.server.tunnel_server.PeeringLayer`.

    Holds the peers allowed to connect to us (id -> token), our outgoing
    links by peer id and, for each peer session that connected to us, the
    client keys it advertised. It is built from what it uses: the server's
    client sessions (announced to peers, and dialed for peers' relayed
    dials), the sessions of peers that connected to us, ``piper`` (relayed
    dials are piped with it), the server's peer id and token (presented on
    our links), limits and observer. :meth:`for_server` takes them from a
    :class:`~remotedialer.server.Server`, which does so by default.
    """

    def __init__(
        self,
        client_sessions: SessionManager,
        peer_sessions: SessionManager,
        piper: Piper,
        *,
        peer_id: Optional[str] = None,
        peer_token: Optional[str] = None,
        limits: Limits = DEFAULT_LIMITS,
        observer: Optional[Observer] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        backoff: Backoff = PEER_BACKOFF,
        local_dial: Optional[LocalDial] = None,
    ) -> None:
        self.client_sessions = client_sessions
        #: Dials a relayed CONNECT through our own sessions of the key (the
        #: server's, under its dial policy: ``Server.dial_local``).
        self.dial_local: LocalDial = local_dial or self._dial_first
        self.peer_sessions = peer_sessions
        self.peer_id = peer_id
        self.peer_token = peer_token
        self.limits = limits
        self.observer = observer
        self.piper = piper
        self.ssl_context = ssl_context
        self.backoff = backoff
        self._lock = threading.Lock()  # guards _tokens, _links and _advertised
        self._tokens: Dict[str, str] = {}  # peers allowed to connect: id -> token
        self._links: Dict[str, PeerLink] = {}
        # peer session -> client key -> session keys it advertised
        self._advertised: Dict[Session, Dict[str, Set[int]]] = {}
        self._relay_pool = ThreadPool(max(2, limits.dial_workers // 4), "remotedialer-peer-relay")
        peer_sessions.add_listener(self._on_peer_session)

    @classmethod
    def for_server(cls, server: "Server") -> "Peering":
        """The peering of ``server`` (a
        :data:`~remotedialer.server.tunnel_server.PeeringFactory`)."""
        return cls(
            server.session_manager,
            server.peer_sessions,
            server.piper,
            peer_id=server.peer_id,
            peer_token=server.peer_token,
            limits=server.limits,
            observer=server.observer,
            ssl_context=server.peer_ssl_context,
            local_dial=server.dial_local,
        )

    def _dial_first(
        self, client_key: str, proto: str, address: str, timeout: Optional[float],
        skip: Tuple[Type[BaseException], ...],
    ) -> Optional[TunnelConnection]:
        return dial_first(self.client_sessions.sessions(client_key), proto, address, timeout, skip)

    # ------------------------------------------------------------- the links
    def add_peer(self, url: str, peer_id: str, token: str) -> None:
        """Accept ``peer_id`` with ``token`` and keep a link to it at ``url``.
        Adding a peer again with other settings replaces its link."""
        if not self.peer_id or not self.peer_token:
            raise ValueError("the server needs peer_id and peer_token to peer")
        spec = PeerSpec(peer_id, token, url)
        with self._lock:
            old = self._links.get(peer_id)
            if old is not None and old.spec == spec:
                return
            link = PeerLink(self, spec, self.ssl_context, self.backoff)
            self._links[peer_id] = link
            self._tokens[peer_id] = token
        if old is not None:
            old.stop()
        log.info("adding peer %s at %s", peer_id, url)
        link.start()

    def remove_peer(self, peer_id: str) -> None:
        """Forget ``peer_id``: stop its link and refuse it from now on."""
        with self._lock:
            link = self._links.pop(peer_id, None)
            self._tokens.pop(peer_id, None)
        for session in self.peer_sessions.sessions(peer_id):
            session.close("peer removed")
        if link is not None:
            log.info("removing peer %s", peer_id)
            link.stop()

    def accept_peer(self, peer_id: str, token: str) -> None:
        """Let ``peer_id`` connect to us with ``token``, without a link of
        ours to it (:meth:`add_peer` does both)."""
        with self._lock:
            self._tokens[peer_id] = token

    def authenticate(self, headers: Union[Mapping[str, str], "Headers"]) -> Optional[str]:
        """The peer id if ``headers`` carry ``X-API-Tunnel-ID`` and
        ``X-API-Tunnel-Token`` matching a known peer (tokens compared in
        constant time), else ``None`` (the server's authorizer decides)."""
        peer_id = headers.get(PEER_ID_HEADER, "")
        token = headers.get(PEER_TOKEN_HEADER, "")
        if not peer_id or not token:
            return None
        with self._lock:
            expected = self._tokens.get(peer_id)
        if expected is None:
            return None
        if not hmac.compare_digest(expected.encode("utf-8"), token.encode("utf-8")):
            return None
        return peer_id

    def refusal(self, headers: Union[Mapping[str, str], "Headers"]) -> Optional[str]:
        """Why a request carrying the peer headers is not an accepted peer
        link: ``"peer ID: token mismatch"``, ``"peer ID: unknown peer id"`` or
        ``"peer ID: no token"``; ``None`` for a request without them or an
        accepted one. Never shows a token."""
        peer_id = headers.get(PEER_ID_HEADER, "")
        if not peer_id:
            return None
        if not headers.get(PEER_TOKEN_HEADER, ""):
            return f"peer {peer_id}: no token"
        if self.authenticate(headers) is not None:
            return None
        with self._lock:
            known = peer_id in self._tokens
        return f"peer {peer_id}: token mismatch" if known else f"peer {peer_id}: unknown peer id"

    def _on_peer_session(self, added: bool, peer_id: str, _session: Session) -> None:
        """A peer connected to us, so it is up: if our own link to it is
        waiting to reconnect, reconnect now (it learns our clients sooner)."""
        if not added:
            return
        with self._lock:
            link = self._links.get(peer_id)
        if link is not None and not link.connected:
            link.client.retry_now()

    def links(self) -> List[PeerLink]:
        """Our outgoing links."""
        with self._lock:
            return list(self._links.values())

    def flush_announcements(self, timeout: float) -> bool:
        """Wait until every link has sent the ADD/REMOVE_CLIENT announcements
        queued so far; False if some did not within ``timeout`` seconds
        (shared by all links)."""
        markers = [link.flush_marker() for link in self.links()]
        deadline = time.monotonic() + timeout
        return all([marker.wait(max(0.0, deadline - time.monotonic())) for marker in markers])

    def close(self) -> None:
        """Stop every link."""
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.stop()
        self._relay_pool.shutdown()

    # --------------------------------------------- what peers advertise to us
    def on_client_change(self, session: Session, added: bool, client_key: str, session_key: int) -> None:
        """Client listener of peer sessions: record ADD/REMOVE_CLIENT."""
        with self._lock:
            if session.closed:
                return
            if session not in self._advertised:
                self._advertised[session] = {}
                session.add_close_callback(self._forget_session)
            keys = self._advertised[session].setdefault(client_key, set())
            if added:
                keys.add(session_key)
            else:
                keys.discard(session_key)
                if not keys:
                    del self._advertised[session][client_key]
        log.debug("peer %s %s client %s/%s", session.client_key,
                  "added" if added else "removed", client_key, session_key)

    def _forget_session(self, session: Session) -> None:
        with self._lock:
            self._advertised.pop(session, None)

    def peers_for(self, client_key: str) -> List[Session]:
        """Open peer sessions that advertised ``client_key``."""
        with self._lock:
            return [
                session for session, keys in self._advertised.items()
                if client_key in keys and not session.closed
            ]

    def remote_clients(self) -> Dict[str, List[str]]:
        """Client keys reachable through peers: peer id -> sorted keys."""
        with self._lock:
            result: Dict[str, Set[str]] = {}
            for session, keys in self._advertised.items():
                if not session.closed:
                    result.setdefault(session.client_key, set()).update(keys)
        return {peer: sorted(keys) for peer, keys in result.items()}

    def dial(
        self, client_key: str, proto: str, address: str, timeout: Optional[float]
    ) -> Optional[TunnelConnection]:
        """Dial through a peer that advertised ``client_key``: CONNECT
        ``clientKey::proto/address`` on its session. ``None`` if none did."""
        relayed_proto = f"{client_key}{PEER_PROTO_SEPARATOR}{proto}"
        return dial_first(self.peers_for(client_key), relayed_proto, address, timeout)

    # ------------------------------------------------- relaying peers' dials
    def handle_connect(self, conn: TunnelConnection) -> None:
        """Connect handler for peer sessions and links: relay
        ``clientKey::proto/address`` through our own session for the key.
        Only local sessions are used, so a relay never bounces between peers."""
        client_key, sep, proto = conn.proto.partition(PEER_PROTO_SEPARATOR)
        if not sep or not client_key or not proto:
            raise ConnectNotAllowedError(f"invalid clientKey/proto: {conn.proto}")
        self._relay_pool.submit(self._relay, conn, client_key, proto)

    def _relay(self, conn: TunnelConnection, client_key: str, proto: str) -> None:
        try:
            target = self.dial_local(
                client_key, proto, conn.address, self.limits.control_write_timeout,
                (TunnelClosedError, OSError),
            )
        except DialRefusedError as exc:  # the holding server's dial policy (logged)
            conn.abort(exc)
            return
        if target is None:
            conn.abort(NoSessionError(f"failed to find Session for client {client_key}"))
            return
        self.piper.pipe_tunnels(conn, target)
