"""Rolling restart of a scaled-out server under agents, on loopback.

``python -m benchmarks.rolling [--agents 300] [--instances 3] [--runs 1]``

A small Kubernetes, played in one process:

* **pods**: gunicorn instances of the example server (gthread, one worker),
  each on its own port of 127.0.0.1, peering through DNS
  (``REMOTEDIALER_PEERS_FROM_DNS``) with graceful shutdown
  (``REMOTEDIALER_DRAIN_SECONDS``);
* **the headless Service**: a DNS server on loopback (:mod:`testkit.dns`)
  publishing an SRV record (address and port) for every running pod, ready
  or not (``publishNotReadyAddresses``, as in deploy/kubernetes/);
* **the Service**: a TCP load balancer (:class:`ServiceBalancer`) spreading
  new connections over the ready pods;
* **the endpoints controller**: a thread probing every pod's ``/readyz``
  and updating both;
* **the rollout**: for each old pod, start a new one, wait until it is ready
  and ``min_ready`` seconds more (the old pods discover it), then SIGTERM
  the old one and wait for it to exit (maxSurge 1, maxUnavailable 0).

Agents are :class:`~remotedialer.client.TunnelClient` objects in this process
connecting through the Service; a request loop sends
``/client/<agent>/http/<target>/`` requests through the Service the whole
time. Reported: how long each agent was away (from its tunnel's close to
its next tunnel), failed requests (those while their own agent was moving,
and the others), requests that ran into their timeout, how long discovery
took to list a new pod everywhere, and whether any session table holds
something it should not once the roll is over.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from remotedialer.server.process import raise_open_files_limit
from testkit.dns import ZoneServer

from .procs import BenchError, free_port, wait_until

__all__ = ["RollOptions", "RollResult", "ServiceBalancer", "run_roll", "main"]

TOKEN = "rolling-restart-token"
NAME = "peers.rolling.test"
PROBE_INTERVAL = 0.1


@dataclass
class RollOptions:
    """What to run: sizes and timings (seconds)."""

    agents: int = 300
    instances: int = 3
    peer_refresh: float = 1.0
    drain_seconds: float = 2.0
    request_threads: int = 8
    request_timeout: float = 5.0
    #: An agent counts as moving from its tunnel's close until this long
    #: after its next tunnel is up (its new instance tells the peers).
    moving_grace: float = 0.5
    #: ...and from this long before the agent noticed the close: the agent
    #: notes it when its reader thread runs, which in this busy process
    #: trails the server's close (by 20 ms and more, measured).
    notice_lag: float = 0.2
    workdir: Optional[str] = None


@dataclass
class RollResult:
    """What one roll measured; see the module doc."""

    agents: int
    instances: int
    roll_seconds: float = 0.0
    moves: int = 0
    agents_not_back: List[str] = field(default_factory=list)
    away_max: float = 0.0
    away_p50: float = 0.0
    away_p99: float = 0.0
    requests: int = 0
    failed: int = 0
    failed_while_moving: int = 0
    failed_otherwise: int = 0
    failed_otherwise_examples: List[str] = field(default_factory=list)
    stalled: int = 0
    request_p50_ms: float = 0.0
    request_max_ms: float = 0.0
    discovery_max: float = 0.0
    stale_entries: List[str] = field(default_factory=list)
    #: The machine's 1-minute load average before and after the roll.
    load_average: Tuple[float, float] = (0.0, 0.0)
    #: What happened when (seconds from the start of the roll).
    timeline: List[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.instances} instances, {self.agents} agents: roll {self.roll_seconds:.1f}s, "
            f"{self.moves} moves, agents away max {self.away_max:.2f}s (p50 {self.away_p50:.2f}, "
            f"p99 {self.away_p99:.2f}), not back {len(self.agents_not_back)}; requests {self.requests}, "
            f"failed {self.failed} ({self.failed_while_moving} while their agent moved, "
            f"{self.failed_otherwise} otherwise), stalled {self.stalled}, p50 {self.request_p50_ms:.1f} ms, "
            f"max {self.request_max_ms:.0f} ms; discovery max {self.discovery_max:.2f}s; "
            f"stale session-table entries {len(self.stale_entries)}; load average "
            f"{self.load_average[0]:.1f}/{self.load_average[1]:.1f} on {os.cpu_count()} cores"
        )


# ------------------------------------------------------------ the Service
class ServiceBalancer:
    """A TCP load balancer on 127.0.0.1 (kube-proxy's part): each new
    connection goes to the next ready backend, round robin; connections
    already open stay where they are. One thread, non-blocking sockets."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4096)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()  # guards _backends and _next
        self._backends: List[int] = []
        self._next = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        # socket -> (its peer, bytes waiting to be written to the peer)
        self._pending: Dict[socket.socket, Tuple[socket.socket, bytearray]] = {}
        self._eof: Set[socket.socket] = set()  # sockets that sent their end
        self._done: Set[socket.socket] = set()  # ...whose end was passed on to the peer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="service-balancer", daemon=True)
        self._thread.start()

    def set_backends(self, ports: Sequence[int]) -> None:
        with self._lock:
            self._backends = sorted(ports)

    def _pick(self) -> List[int]:
        with self._lock:
            backends = list(self._backends)
            self._next += 1
            start = self._next
        return [backends[(start + i) % len(backends)] for i in range(len(backends))]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            upstream = None
            for port in self._pick():  # a backend that just died refuses: try the next
                try:
                    upstream = socket.create_connection(("127.0.0.1", port), timeout=1)
                    break
                except OSError:
                    continue
            if upstream is None:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pending[client] = (upstream, bytearray())
            self._pending[upstream] = (client, bytearray())
            self._selector.register(client, selectors.EVENT_READ, "pipe")
            self._selector.register(upstream, selectors.EVENT_READ, "pipe")

    def _close_pair(self, sock: socket.socket) -> None:
        """Close ``sock`` and its peer (both directions are done, or one failed)."""
        peer = self._pending[sock][0] if sock in self._pending else None
        for each in (sock, peer):
            if each is None:
                continue
            self._pending.pop(each, None)
            self._eof.discard(each)
            self._done.discard(each)
            try:
                self._selector.unregister(each)
            except (KeyError, ValueError):
                pass
            each.close()

    def _finish_direction(self, sock: socket.socket) -> None:
        """``sock`` ended and all it sent reached its peer: pass the end on
        (a half close, as TCP between the two ends would)."""
        peer = self._pending[sock][0]
        try:
            peer.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._done.add(sock)
        if peer in self._done:
            self._close_pair(sock)

    def _forward(self, sock: socket.socket, events: int) -> None:
        """Read from ``sock`` into its buffer for the peer; write the peer's
        buffer for ``sock`` out. A full buffer stops reading its source
        (backpressure); an error on either side closes both."""
        if sock not in self._pending:
            return
        peer, outgoing = self._pending[sock]
        if events & selectors.EVENT_WRITE:
            inbound = self._pending[peer][1]
            try:
                sent = sock.send(inbound)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close_pair(sock)
                return
            del inbound[:sent]
            if not inbound and peer in self._eof and peer not in self._done:
                self._finish_direction(peer)
        if events & selectors.EVENT_READ and sock in self._pending:
            try:
                data: Optional[bytes] = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._close_pair(sock)
                return
            if data == b"":
                self._eof.add(sock)
                if not outgoing:
                    self._finish_direction(sock)
            elif data:
                outgoing += data
        self._update(sock)
        self._update(peer)

    def _update(self, sock: socket.socket) -> None:
        """Wait for ``sock`` to be readable while it has not ended and its
        bytes for the peer are few, and writable while the peer's bytes for
        it wait."""
        if sock not in self._pending:
            return
        peer, outgoing = self._pending[sock]
        events = 0
        if sock not in self._eof and len(outgoing) < (1 << 20):
            events |= selectors.EVENT_READ
        if self._pending[peer][1]:
            events |= selectors.EVENT_WRITE
        try:
            self._selector.get_key(sock)
            registered = True
        except KeyError:
            registered = False
        if events and registered:
            self._selector.modify(sock, events, "pipe")
        elif events:
            self._selector.register(sock, events, "pipe")
        elif registered:
            self._selector.unregister(sock)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, events in self._selector.select(0.05):
                if key.data is None:
                    self._accept()
                else:
                    self._forward(key.fileobj, events)  # type: ignore[arg-type]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in list(self._pending):
            sock.close()
        self._listener.close()
        self._selector.close()


# ------------------------------------------------------------------ pods
class Pod:
    """One gunicorn instance of the example server."""

    def __init__(self, name: str, workdir: str, zone: ZoneServer, options: RollOptions) -> None:
        self.name = name
        self.port = free_port()
        self.peer_id = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"{name}.log")
        threads = options.agents + 64
        env = {
            **os.environ,
            "REMOTEDIALER_ID": self.peer_id,
            "REMOTEDIALER_TOKEN": TOKEN,
            "REMOTEDIALER_PEERS_FROM_DNS": NAME,
            "REMOTEDIALER_DNS_SERVER": f"{zone.address[0]}:{zone.address[1]}",
            "REMOTEDIALER_PEER_REFRESH": str(options.peer_refresh),
            "REMOTEDIALER_DRAIN_SECONDS": str(options.drain_seconds),
            "REMOTEDIALER_DEBUG_ENDPOINTS": "1",
        }
        args = [
            sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", str(threads),
            "--worker-connections", str(2 * threads + 256), "-b", self.peer_id,
            "--graceful-timeout", str(int(options.drain_seconds + 10)), "--backlog", "2048",
            *_control_socket(os.path.join(workdir, f"{name}.ctl")),
            "remotedialer.cli.server:make_app()",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.terminated_at: Optional[float] = None
        #: When the controller's probe first got an answer (it is in DNS from its start).
        self.listening_at: Optional[float] = None

    def get(self, path: str, timeout: float = 1.0) -> Tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.peer_id}{path}", timeout=timeout) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def probe(self) -> bool:
        """The readiness probe: whether /readyz answers 200."""
        status = self.get("/readyz")[0]
        if status and self.listening_at is None:
            self.listening_at = time.monotonic()
        return status == 200

    def table(self) -> Dict[str, Any]:
        status, body = self.get("/debug/sessions", timeout=5)
        if status != 200:
            raise BenchError(f"{self.name}: /debug/sessions answered {status}")
        return dict(json.loads(body))

    def terminate(self) -> None:
        self.terminated_at = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def _control_socket(path: str) -> List[str]:
    import gunicorn.config

    if any(setting.name == "control_socket" for setting in gunicorn.config.KNOWN_SETTINGS):
        return ["--control-socket", path]
    return []


class Cluster:
    """Pods, the DNS zone, the Service and the endpoints controller."""

    def __init__(self, options: RollOptions, workdir: str) -> None:
        self.options = options
        self.workdir = workdir
        self.zone = ZoneServer()
        self.service = ServiceBalancer()
        self._lock = threading.Lock()  # guards pods and ready
        self.pods: Dict[str, Pod] = {}
        self.ready: List[str] = []
        self._count = 0
        self._stop = threading.Event()
        self._controller = threading.Thread(target=self._control, name="endpoints", daemon=True)
        self._controller.start()

    def start_pod(self) -> Pod:
        self._count += 1
        pod = Pod(f"pod{self._count}", self.workdir, self.zone, self.options)
        with self._lock:
            self.pods[pod.name] = pod
        return pod

    def _control(self) -> None:
        """Publish the ready pods in DNS and in the Service, as Kubernetes'
        endpoints do (readiness probe every PROBE_INTERVAL)."""
        published: Optional[Tuple[List[str], List[str]]] = None
        while not self._stop.wait(PROBE_INTERVAL):
            with self._lock:
                pods = list(self.pods.values())
            running = [pod for pod in pods if pod.proc.poll() is None]
            ready = [pod for pod in running if pod.probe()]
            names = (sorted(pod.name for pod in running), sorted(pod.name for pod in ready))
            if names != published:
                self.zone.set_endpoints(NAME, [("127.0.0.1", pod.port) for pod in running])
                self.service.set_backends([pod.port for pod in ready])
                published = names
                with self._lock:
                    self.ready = names[1]

    def is_ready(self, pod: Pod) -> bool:
        with self._lock:
            return pod.name in self.ready

    def remove(self, pod: Pod) -> None:
        with self._lock:
            self.pods.pop(pod.name, None)

    def close(self) -> None:
        self._stop.set()
        self._controller.join(5)
        with self._lock:
            pods = list(self.pods.values())
        for pod in pods:
            pod.kill()
        self.service.close()
        self.zone.stop()


# ---------------------------------------------------------------- agents
class Target(http.server.ThreadingHTTPServer):
    """What agents dial: a tiny HTTP server answering ``ok``."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a request cut by a tunnel that closed: counted by the request loop

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OkHandler)
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()


class _OkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Agents:
    """``count`` tunnel clients through the Service, recording each tunnel's
    start and end."""

    def __init__(self, count: int, service_port: int, target_port: int) -> None:
        from remotedialer.client import TunnelClient

        self._lock = threading.Lock()  # guards events and up
        self.events: Dict[str, List[Tuple[str, float]]] = {}
        self.up: Dict[str, int] = {}
        allowed = f"127.0.0.1:{target_port}"
        self.keys = [f"agent-{index:04d}" for index in range(count)]
        self.clients = [
            TunnelClient(f"ws://127.0.0.1:{service_port}/connect", {"X-Tunnel-ID": key},
                         lambda proto, address: address == allowed,
                         on_connect=self._on_connect_for(key))
            for key in self.keys
        ]

    def _on_connect_for(self, key: str) -> Any:
        def on_connect(session: Any) -> None:
            now = time.monotonic()
            with self._lock:
                self.events.setdefault(key, []).append(("up", now))
                self.up[key] = self.up.get(key, 0) + 1

            def on_close(_session: Any) -> None:
                with self._lock:
                    self.events[key].append(("down", time.monotonic()))
                    self.up[key] -= 1

            session.add_close_callback(on_close)

        return on_connect

    def start(self) -> None:
        for client in self.clients:
            client.start()

    def all_up(self) -> bool:
        with self._lock:
            return all(self.up.get(key, 0) == 1 for key in self.keys)

    def stop(self) -> None:
        for client in self.clients:
            client.stop(timeout=0)
        for client in self.clients:
            client.stop(timeout=5)

    def moving_windows(self, lag: float, grace: float) -> Dict[str, List[Tuple[float, float]]]:
        """Per agent: (tunnel closed - lag, next tunnel up + grace) intervals."""
        windows: Dict[str, List[Tuple[float, float]]] = {}
        with self._lock:
            events = {key: list(value) for key, value in self.events.items()}
        for key, items in events.items():
            down: Optional[float] = None
            for kind, at in items:
                if kind == "down":
                    down = at - lag
                elif down is not None:
                    windows.setdefault(key, []).append((down, at + grace))
                    down = None
            if down is not None:
                windows.setdefault(key, []).append((down, float("inf")))
        return windows


@dataclass
class Request:
    agent: str
    started: float
    ended: float
    error: str  # "" for success


class RequestLoop:
    """Threads sending requests through the Service, one agent after the other."""

    def __init__(self, agents: Sequence[str], service_port: int, target_port: int, threads: int,
                 timeout: float) -> None:
        self.agents = list(agents)
        self.service_port = service_port
        self.target_port = target_port
        self.timeout = timeout
        self._lock = threading.Lock()  # guards results and _next
        self.results: List[Request] = []
        self._next = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"requests-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                agent = self.agents[self._next % len(self.agents)]
                self._next += 1
            url = (f"http://127.0.0.1:{self.service_port}/client/{agent}/http/"
                   f"127.0.0.1:{self.target_port}/?timeout={self.timeout:g}")
            started = time.monotonic()
            error = ""
            try:
                request = urllib.request.Request(url, headers={"Connection": "close"})
                with urllib.request.urlopen(request, timeout=self.timeout + 1) as answer:
                    if answer.read() != b"ok":
                        error = "wrong body"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}: {exc.read()[:80]!r}"
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.results.append(Request(agent, started, time.monotonic(), error))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)


# ------------------------------------------------------------------ roll
def _wait_ready_everywhere(cluster: Cluster, pod: Pod, others: Sequence[Pod], timeout: float) -> float:
    """Wait until the new pod is ready (it becomes ready only once its peers
    linked with it); return the seconds from when it first answered (it was
    in DNS from its start) until every other pod had its link to it up."""
    wait_until(lambda: all(pod.peer_id in other.table()["links_up"] for other in others), timeout,
               f"the others to find {pod.name}", interval=0.05)
    linked = time.monotonic()
    wait_until(lambda: cluster.is_ready(pod), timeout, f"{pod.name} to be ready")
    assert pod.listening_at is not None
    return max(0.0, linked - pod.listening_at)


def check_tables(pods: Sequence[Pod], agents: Sequence[str], gone: Sequence[str]) -> List[str]:
    """Everything in the pods' session tables that should not be there."""
    problems: List[str] = []
    tables = {pod.peer_id: pod.table() for pod in pods}
    holders: Dict[str, List[str]] = {}
    for peer_id, table in tables.items():
        for key, count in table["clients"].items():
            holders.setdefault(key, []).append(peer_id)
            if count != 1:
                problems.append(f"{peer_id} holds {count} sessions of {key}")
        others = sorted(other for other in tables if other != peer_id)
        if table["peers"] != others:
            problems.append(f"{peer_id} peers with {table['peers']}, not {others}")
        for peer, keys in table["remote_clients"].items():
            if peer not in tables:
                problems.append(f"{peer_id} still has clients of the old instance {peer}")
            elif sorted(keys) != sorted(tables[peer]["clients"]):
                extra = sorted(set(keys) - set(tables[peer]["clients"]))
                missing = sorted(set(tables[peer]["clients"]) - set(keys))
                problems.append(f"{peer_id}'s view of {peer}: extra {extra[:5]}, missing {missing[:5]}")
        for old in gone:
            if old in table["peers"] or old in table["remote_clients"]:
                problems.append(f"{peer_id} still knows the old instance {old}")
    for key in agents:
        if len(holders.get(key, [])) != 1:
            problems.append(f"{key} is held by {holders.get(key, [])}")
    for key in holders:
        if key not in agents:
            problems.append(f"unknown client {key} held by {holders[key]}")
    return problems


def run_roll(options: RollOptions) -> RollResult:
    """Start the cluster and agents, roll every instance once under the
    request loop, and measure; see the module doc. Raises
    :class:`BenchError` if the cluster cannot be set up."""
    result = RollResult(options.agents, options.instances)
    workdir = options.workdir or tempfile.mkdtemp(prefix="rolling-")
    log_handler = logging.FileHandler(os.path.join(workdir, "agents.log"))
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    agents_log = logging.getLogger("remotedialer")
    saved_level, saved_propagate = agents_log.level, agents_log.propagate
    agents_log.addHandler(log_handler)
    agents_log.setLevel(logging.INFO)
    agents_log.propagate = False
    settle = 30.0 + options.agents / 20
    cluster = Cluster(options, workdir)
    target = Target()
    agents: Optional[Agents] = None
    loop: Optional[RequestLoop] = None
    try:
        old = [cluster.start_pod() for _ in range(options.instances)]
        for pod in old:
            wait_until(lambda p=pod: cluster.is_ready(p), settle, f"{pod.name} to be ready")
        wait_until(lambda: all(len(pod.table()["links_up"]) == len(old) - 1 for pod in old), settle,
                   "the first instances to peer", interval=0.1)
        agents = Agents(options.agents, cluster.service.port, target.port)
        agents.start()
        wait_until(agents.all_up, settle, "every agent to connect", interval=0.05)
        loop = RequestLoop(agents.keys, cluster.service.port, target.port, options.request_threads,
                           options.request_timeout)
        loop.start()
        time.sleep(1.0)  # requests before the roll, as a baseline
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        current = list(old)
        discovery: List[float] = []

        def note(text: str) -> None:
            result.timeline.append(f"{time.monotonic() - started:7.2f}s {text}")

        for pod in old:
            new = cluster.start_pod()
            note(f"{new.name} started")
            others = [p for p in current if p is not pod]
            discovery.append(_wait_ready_everywhere(cluster, new, current, settle))
            note(f"{new.name} ready, linked after {discovery[-1]:.2f}s")
            time.sleep(options.peer_refresh)  # minReadySeconds
            pod.terminate()
            note(f"{pod.name} terminated")
            try:
                pod.proc.wait(options.drain_seconds + 30)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{pod.name} did not exit after SIGTERM") from None
            note(f"{pod.name} exited")
            cluster.remove(pod)
            current = others + [new]
            wait_until(agents.all_up, settle, "every agent to be back", interval=0.05)
        result.roll_seconds = time.monotonic() - started
        result.load_average = (load_before, os.getloadavg()[0])
        time.sleep(1.0)  # requests after the roll
        loop.stop()
        time.sleep(2 * options.peer_refresh)  # the last announcements and refreshes
        result.stale_entries = check_tables(current, agents.keys, [pod.peer_id for pod in old])
        _measure(result, agents, loop, options, started)
        result.discovery_max = max(discovery)
        for pod in old:
            if pod.proc.returncode != 0:
                result.stale_entries.append(f"{pod.name} exited with {pod.proc.returncode}")
        return result
    finally:
        if loop is not None:
            loop.stop()
        if agents is not None:
            agents.stop()
        cluster.close()
        target.shutdown()
        target.server_close()
        agents_log.removeHandler(log_handler)
        agents_log.setLevel(saved_level)
        agents_log.propagate = saved_propagate
        log_handler.close()


def _measure(result: RollResult, agents: Agents, loop: RequestLoop, options: RollOptions,
             origin: float) -> None:
    windows = agents.moving_windows(options.notice_lag, options.moving_grace)
    slack = options.notice_lag + options.moving_grace
    away = [end - start - slack for spans in windows.values() for start, end in spans]
    result.moves = len(away)
    result.agents_not_back = sorted(key for key, spans in windows.items() if spans[-1][1] == float("inf"))
    finite = sorted(value for value in away if value != float("inf"))
    if finite:
        result.away_max = finite[-1]
        result.away_p50 = statistics.median(finite)
        result.away_p99 = finite[min(len(finite) - 1, int(len(finite) * 0.99))]
    durations = sorted(request.ended - request.started for request in loop.results)
    result.requests = len(loop.results)
    if durations:
        result.request_p50_ms = statistics.median(durations) * 1000
        result.request_max_ms = durations[-1] * 1000
    for request in loop.results:
        if request.ended - request.started >= options.request_timeout:
            result.stalled += 1
        if not request.error:
            continue
        result.failed += 1
        moving = any(start <= request.ended and request.started <= end
                     for start, end in windows.get(request.agent, ()))
        if moving:
            result.failed_while_moving += 1
        else:
            result.failed_otherwise += 1
            if len(result.failed_otherwise_examples) < 5:
                result.failed_otherwise_examples.append(
                    f"{request.started - origin:.2f}s-{request.ended - origin:.2f}s {request.agent}: "
                    f"{request.error} (moves: "
                    + ", ".join(f"{start - origin:.2f}-{end - origin:.2f}"
                                for start, end in windows.get(request.agent, ())) + ")")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rolling", description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--peer-refresh", type=float, default=1.0)
    parser.add_argument("--drain-seconds", type=float, default=2.0)
    parser.add_argument("--request-threads", type=int, default=8)
    parser.add_argument("--request-timeout", type=float, default=RollOptions.request_timeout)
    parser.add_argument("--workdir", metavar="DIR", help="keep the processes' logs here")
    parser.add_argument("--json", metavar="PATH", help="write every run's figures as JSON")
    args = parser.parse_args(argv)
    raise_open_files_limit()

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # the instances started are stopped on the way out

    signal.signal(signal.SIGTERM, stop)
    results = []
    for run in range(args.runs):
        options = RollOptions(agents=args.agents, instances=args.instances, peer_refresh=args.peer_refresh,
                              drain_seconds=args.drain_seconds, request_threads=args.request_threads,
                              request_timeout=args.request_timeout, workdir=args.workdir)
        result = run_roll(options)
        results.append(result)
        print(f"run {run + 1}: {result.summary()}", flush=True)
        for example in result.timeline + result.failed_otherwise_examples + result.stale_entries[:10]:
            print(f"    {example}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(result) for result in results], handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
