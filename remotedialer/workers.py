"""A gunicorn worker class for tunnel servers (and any WSGI app).

::

    gunicorn -k remotedialer.workers.RemotedialerWorker -b 0.0.0.0:8123 \\
        'remotedialer.cli.server:make_app()'

gunicorn's arbiter forks, watches and restarts the workers as for its own
classes: signals (TERM drains gracefully within ``--graceful-timeout``,
QUIT/INT stop at once, USR1 reopens the logs), ``--max-requests`` recycling
(the worker then stops as on TERM),
the heartbeat behind ``--timeout``, logging (``--access-logfile``) and the
server hooks (``post_fork``, ``post_worker_init``, ``pre_request``,
``post_request``, ``worker_int``, ``worker_exit``...).

Each accepted connection is served by one thread from accept to close,
keep-alive requests included, with the project's HTTP/1.1 keep-alive front
end (:class:`~remotedialer.gateway.frontend.KeepAliveRequestHandler`, the one
``remotedialer server`` runs); a WebSocket tunnel keeps its thread for as
long as it lives, as under ``remotedialer server``. gunicorn's ``gthread``
worker instead hands every request between its poller and a thread pool,
which costs wake-ups and CPU per request (docs/benchmarks.rst).

Threads are bounded: at most ``--threads`` when given (more than 1), else
``--worker-connections`` (gunicorn's default 1000) connections are served
at once, tunnels included; further connections wait in the listen backlog,
and an idle keep-alive connection gives its thread up to one of them.
``--keep-alive`` is the idle timeout between requests. With ``--certfile``
the connection thread does the TLS handshake (within 10 s) before the first
request.

``pre_request`` and ``post_request`` hooks and the access log get summaries
of the request and response (:class:`RequestSummary`,
:class:`ResponseSummary`) with the attributes gunicorn's hooks and log
format read most (method, path, headers; status, headers), not gunicorn's
own parser objects.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import selectors
import signal
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from gunicorn import config as gunicorn_config  # type: ignore[import-untyped]
from gunicorn import sock as gunicorn_sock
from gunicorn.workers.base import Worker  # type: ignore[import-untyped]

from .gateway.frontend import KeepAliveRequestHandler
from .server.process import THREAD_STACK_SIZE, tune_interpreter_for_many_threads

__all__ = ["RemotedialerWorker", "RequestSummary", "ResponseSummary"]

log = logging.getLogger(__name__)

#: Longest wait of the accept loop between heartbeats (gunicorn kills a
#: worker that does not notify within ``--timeout``, 30 s by default).
_LOOP_SECONDS = 1.0
#: Seconds a new TLS connection has to complete its handshake.
_HANDSHAKE_SECONDS = 10.0
#: The environ key where the recording app leaves ``(status, headers)``.
_RESPONSE_KEY = "remotedialer.worker.response"


class RequestSummary:
    """What ``pre_request``/``post_request`` hooks and the access log see of a request."""

    def __init__(self, handler: KeepAliveRequestHandler) -> None:
        self.method: str = handler.command
        self.uri: str = handler.path
        self.path, _, self.query = handler.path.partition("?")
        major, _, minor = handler.request_version.partition("/")[2].partition(".")
        self.version: Tuple[int, int] = (int(major or 1), int(minor or 0))
        self.headers: List[Tuple[str, str]] = [
            (name.upper(), value) for name, value in handler.headers.items()]
        self.remote_addr = handler.client_address

    def __repr__(self) -> str:
        return f"<RequestSummary {self.method} {self.uri}>"


class ResponseSummary:
    """What ``post_request`` hooks and the access log see of a response
    (``status`` is None if the app never started one)."""

    def __init__(self, status: Optional[str], headers: List[Tuple[str, str]]) -> None:
        self.status = status
        self.status_code = int(status.split(None, 1)[0]) if status else None
        self.headers = headers
        self.sent: Optional[int] = None  # bytes are not counted: "-" in the access log


class _WorkerRequestHandler(KeepAliveRequestHandler):
    """The keep-alive front end, counting requests for ``--max-requests``
    and running the request hooks and the access log when configured."""

    server: "_Listener"  # type: ignore[assignment]  # what it reads of a server

    def run_wsgi(self) -> None:
        worker = self.server.worker
        if not worker.wants_request_hooks:
            try:
                super().run_wsgi()
            finally:
                if not worker.request_done():
                    self.close_connection = True
            return
        started = datetime.datetime.now()
        summary = RequestSummary(self)
        worker.cfg.pre_request(worker, summary)
        try:
            super().run_wsgi()
        finally:
            if not worker.request_done():
                self.close_connection = True
            status, headers = self.environ.get(_RESPONSE_KEY, (None, []))
            response = ResponseSummary(status, headers)
            try:
                worker.log.access(response, summary, self.environ, datetime.datetime.now() - started)
                worker.cfg.post_request(worker, summary, self.environ, response)
            except Exception:
                worker.log.exception("post_request hook or access log failed")


class _UnixRequestHandler(_WorkerRequestHandler):
    disable_nagle_algorithm = False  # no TCP_NODELAY on a Unix socket


class _Listener:
    """What the front end's request handler reads of its server, for one
    of gunicorn's listening sockets."""

    passthrough_errors = False
    multithread = True
    _server_version = "gunicorn (remotedialer worker)"  # werkzeug's handler reads this name

    def __init__(self, worker: "RemotedialerWorker", sock: socket.socket, app: Callable[..., Any]) -> None:
        self.worker = worker
        self.socket = sock
        self.app = app
        self.ssl_context = worker.ssl_context  # werkzeug's handler: the wsgi.url_scheme
        self.keepalive_timeout = float(worker.cfg.keepalive)
        self.stopping = worker.stopping
        self.multiprocess = worker.cfg.workers > 1
        self.is_unix = sock.family == getattr(socket, "AF_UNIX", None)
        address = sock.getsockname()
        unnamed = self.is_unix or not isinstance(address, tuple)
        self.server_address: Tuple[str, int] = (
            ("localhost", 0) if unnamed else (str(address[0]), int(address[1])))
        self.handler = _UnixRequestHandler if self.is_unix else _WorkerRequestHandler

    def give_up_idle_slot(self) -> bool:
        return self.worker.give_up_idle_slot()

    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug's signature
        getattr(self.worker.log, type if type in ("info", "warning", "error") else "info")(message, *args)


def _recording_app(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """``app`` leaving its response status and headers in the environ, for
    the access log and ``post_request``."""

    def recording(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def recording_start_response(status: str, headers: List[Tuple[str, str]],
                                     exc_info: Any = None) -> Any:
            environ[_RESPONSE_KEY] = (status, headers)
            return start_response(status, headers, exc_info)

        return app(environ, recording_start_response)

    return recording


class RemotedialerWorker(Worker):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn worker: one thread per connection, from accept to close,
    through the project's keep-alive front end (see the module docstring)."""

    # set by gunicorn's Worker (untyped)
    alive: bool
    nr: int
    max_requests: int
    wsgi: Callable[..., Iterable[bytes]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = threading.Event()
        threads = int(self.cfg.threads)
        self.max_threads = threads if threads > 1 else int(self.cfg.worker_connections)
        self._slots = threading.BoundedSemaphore(self.max_threads)
        # _lock guards: nr (requests counted), _connections (threads serving
        # one), _slot_wanted/_slot_freeing (the accept loop waits for a thread;
        # one idle keep-alive connection was asked to give its thread up).
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when _connections drops to 0
        self._connections = 0
        self._slot_wanted = False
        self._slot_freeing = False
        self._recycling = False  # --max-requests reached (guarded by _lock)
        self.wants_request_hooks = False
        self.ssl_context: Optional[ssl.SSLContext] = None

    # -- set-up
    def init_process(self) -> None:
        if self.cfg.is_ssl:
            self.ssl_context = gunicorn_sock.ssl_context(self.cfg)
        tune_interpreter_for_many_threads()
        threading.stack_size(THREAD_STACK_SIZE)
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        cfg = self.cfg
        access_log = bool(cfg.accesslog or cfg.logconfig or cfg.logconfig_dict
                          or getattr(cfg, "logconfig_json", None) or cfg.syslog)
        self.wants_request_hooks = (
            access_log
            or cfg.pre_request is not gunicorn_config.PreRequest.default
            or cfg.post_request is not gunicorn_config.PostRequest.default
        )
        if self.wants_request_hooks:
            self.wsgi = _recording_app(self.wsgi)

    # -- per request, from the connection threads
    def request_done(self) -> bool:
        """Count a served request; False when ``--max-requests`` is reached.
        The worker then stops as on SIGTERM, by sending itself one: an app
        that chained a graceful drain to SIGTERM (``make_app()`` does) closes
        its tunnels first, so that their clients reconnect to the next
        worker instead of holding this one for its graceful timeout."""
        with self._lock:
            self.nr += 1
            if self.nr < self.max_requests or self._recycling:
                return self.alive
            self._recycling = True
        self.log.info("Autorestarting worker after current request.")
        os.kill(os.getpid(), signal.SIGTERM)
        return False

    def give_up_idle_slot(self) -> bool:
        """For an idle keep-alive connection: True (once) when the accept
        loop waits for a thread."""
        if not self._slot_wanted:
            return False
        with self._lock:
            if self._slot_wanted and not self._slot_freeing:
                self._slot_freeing = True
                return True
        return False

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.PIPE[1], b".")
        except (OSError, IndexError):  # pipe full (a wake-up is pending) or not made yet
            pass

    # -- the accept loop (main thread)
    def run(self) -> None:
        listeners = [_Listener(self, sock, self.wsgi) for sock in self.sockets]
        selector = selectors.DefaultSelector()
        for listener in listeners:
            listener.socket.setblocking(False)
            selector.register(listener.socket, selectors.EVENT_READ, listener)
        selector.register(self.PIPE[0], selectors.EVENT_READ, None)
        self.log.info("serving at most %d connections at once, one thread each", self.max_threads)
        try:
            while self.alive:
                self.notify()
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
                if not self._take_slot():
                    continue
                accepted = False
                try:
                    for key, _ in selector.select(_LOOP_SECONDS):
                        if key.data is None:
                            self._drain_pipe()
                        elif not accepted:
                            accepted = self._accept(key.data)
                finally:
                    if not accepted:
                        self._slots.release()
        finally:
            selector.close()
            self._stop()

    def _take_slot(self) -> bool:
        """A thread slot for the next connection; False after waiting
        :data:`_LOOP_SECONDS` in vain (an idle connection is asked to close)."""
        if self._slots.acquire(blocking=False):
            return True
        with self._lock:
            self._slot_wanted = True
        got = self._slots.acquire(timeout=_LOOP_SECONDS)
        if got:
            with self._lock:
                self._slot_wanted = self._slot_freeing = False
        return got

    def _drain_pipe(self) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except OSError:  # drained (EAGAIN)
            pass

    def _accept(self, listener: _Listener) -> bool:
        """Accept one connection on ``listener`` and start its thread; False
        if there was none or the thread could not start."""
        try:
            sock, address = listener.socket.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return False
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.log.warning("cannot accept a connection: %s", exc)
                time.sleep(0.1)  # let connections close before accepting again
                return False
            raise
        if listener.is_unix or not isinstance(address, tuple):
            address = ("<local>", 0)
        with self._lock:
            self._connections += 1
        try:
            threading.Thread(target=self._serve, args=(listener, sock, address),
                             name="remotedialer-worker-conn", daemon=True).start()
        except RuntimeError as exc:  # can't start new thread
            self.log.warning("cannot start a thread for a connection: %s", exc)
            sock.close()
            self._connection_closed()
            return False
        return True

    def _serve(self, listener: _Listener, sock: socket.socket, address: Any) -> None:
        """Serve one connection until it closes (a connection thread)."""
        try:
            if self.ssl_context is not None:
                sock.settimeout(_HANDSHAKE_SECONDS)
                try:
                    sock = self.ssl_context.wrap_socket(
                        sock, server_side=True, suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
                except OSError as exc:  # ssl.SSLError, a timeout, a reset
                    self.log.debug("TLS handshake with %s failed: %s", address, exc)
                    return
            sock.settimeout(None)
            listener.handler(sock, address, listener)  # type: ignore[arg-type]
        except Exception:
            self.log.exception("error serving a connection from %s", address)
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sock.close()
            self._slots.release()
            self._connection_closed()

    def _connection_closed(self) -> None:
        with self._lock:
            self._connections -= 1
            if not self._connections:
                self._idle.notify_all()

    def _stop(self) -> None:
        """Stop accepting; idle keep-alive connections close, those in a
        request (or holding a tunnel) get ``--graceful-timeout`` seconds."""
        self.stopping.set()
        deadline = time.monotonic() + float(self.cfg.graceful_timeout)
        with self._lock:
            while self._connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.log.warning("graceful timeout: closing %d connections still open", self._connections)
                    break
                self.notify()
                self._idle.wait(min(remaining, _LOOP_SECONDS))
