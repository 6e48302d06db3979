"""The example server's front ends for end-to-end tests of ``/client/``:
its own werkzeug-based server in this process, or gunicorn running the app
factory as the deployment docs say; and an agent connected to it."""

from __future__ import annotations

import importlib.util
import threading
from typing import List, Union

import pytest

from remotedialer.app import make_app
from remotedialer.client import Backoff, TunnelClient
from remotedialer.gateway.frontend import BoundedThreadedWSGIServer

from .gunicorn import EXAMPLE_APP, Gunicorn
from .support import TIMEOUT

__all__ = ["FRONT_ENDS", "ExampleServer", "GunicornFront", "start_front", "start_agent"]

#: The servers the example server is documented under: its own, gunicorn's
#: gthread worker and (where the package has it) our gunicorn worker.
FRONT_ENDS: List[str] = ["example", "gthread"] + (
    ["remotedialer.workers.RemotedialerWorker"] if importlib.util.find_spec("remotedialer.workers") else []
)


class ExampleServer:
    """``make_app()`` under :class:`BoundedThreadedWSGIServer` in this
    process; its log lines are in pytest's ``caplog``."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.app = make_app(peers="", timeout=5.0)
        self.httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, self.app, max_threads=32)
        self.port = self.httpd.port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def log_text(self) -> str:
        return self.caplog.text

    def stop(self) -> None:
        self.httpd.shutdown()
        self.app.close()
        self.httpd.server_close()


class GunicornFront(Gunicorn):
    """gunicorn with ``worker`` running the example server's app factory."""

    def __init__(self, worker: str) -> None:
        super().__init__(app=EXAMPLE_APP, worker=worker, threads=8, env={"REMOTEDIALER_TIMEOUT": "5"})


def start_front(kind: str, caplog: pytest.LogCaptureFixture) -> Union[ExampleServer, GunicornFront]:
    """A front end of ``kind`` (one of :data:`FRONT_ENDS`)."""
    return ExampleServer(caplog) if kind == "example" else GunicornFront(kind)


def start_agent(port: int, client_key: str) -> TunnelClient:
    """A client (agent) allowing every target, connected to the front end on ``port``."""
    agent = TunnelClient(f"ws://127.0.0.1:{port}/connect", {"X-Tunnel-ID": client_key},
                         lambda proto, address: True, backoff=Backoff(initial=0.05, maximum=0.2))
    agent.start()
    agent.wait_connected(TIMEOUT)
    return agent
