"""What an agent loads (issue 24): the client side imports only what the
agent needs. Each check runs a fresh interpreter and reads its
``sys.modules``; adding an eager import of the server, werkzeug, urllib3, the
metrics or an integration to the agent's path fails here (the numbers are in
``benchmarks/agent_footprint.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Dict, List

import pytest

FORBIDDEN = [
    "werkzeug", "simple_websocket", "prometheus_client", "urllib3", "requests",
    "gunicorn", "httpx", "httpcore", "kubernetes",
]
"""Third-party packages an agent never loads."""

CORE = [
    "remotedialer", "remotedialer.addresses", "remotedialer.client", "remotedialer.config",
    "remotedialer.connection", "remotedialer.errors", "remotedialer.heartbeat",
    "remotedialer.observer", "remotedialer.piping", "remotedialer.plugins", "remotedialer.protocol",
    "remotedialer.receive_buffer", "remotedialer.session", "remotedialer.singleton",
    "remotedialer.thread_pool", "remotedialer.transports", "remotedialer.transports.base",
    "remotedialer.transports.proxy", "remotedialer.wait",
]
"""The package modules ``import`` of ``TunnelClient`` loads: the core and
the proxy support, not yet the WebSocket (see :data:`CONNECTING`)."""

CONNECTING = [
    "remotedialer.frames", "remotedialer.transports.websocket_client",
]
"""What the first connection attempt adds (with websocket-client and
``ssl``); resumption's modules only load when it is offered."""

ATTEMPT = (
    "import socket\nfrom remotedialer.client import TunnelClient\n"
    "with socket.socket() as probe:\n    probe.bind(('127.0.0.1', 0))\n    port = probe.getsockname()[1]\n"
    "try:\n    TunnelClient(f'ws://127.0.0.1:{port}/connect', proxy='').connect_once()\n"
    "except ConnectionRefusedError:\n    pass"
)
"""A connection attempt (refused: nothing listens on the port)."""

AGENT_MODULES: Dict[str, List[str]] = {
    "from remotedialer.client import TunnelClient": CORE,
    "import remotedialer.cli.client": sorted(CORE + [
        "remotedialer.cli", "remotedialer.cli.client", "remotedialer.examples",
        "remotedialer.examples.agent", "remotedialer.examples.logs",
    ]),
    ATTEMPT: sorted(CORE + CONNECTING),
}

NOT_BEFORE_CONNECTING = ["ssl", "websocket"]
"""Loaded by the first connection attempt, not by ``import`` (nor by
``remotedialer client --help``): websocket-client and ``ssl`` are about half
of the agent's import time."""


STDLIB_ADDED = {"bisect", "copy", "dataclasses", "heapq", "random"}
"""Standard-library packages ``TunnelClient`` may load beyond what ``ssl``
and websocket-client load (the agent's floor; ``benchmarks/agent_footprint.py``
measures it). Not all of them on every Python: 3.9 and the test extras load
some earlier. Private (``_name``) extension modules are left out."""

CLI_STDLIB_ADDED = STDLIB_ADDED | {"argparse", "gettext"}
"""And the CLI: its argument parser (no ``subprocess``: ``remotedialer
bench`` imports it when run; no ``signal``: the commands import it when they
install their handlers)."""

STDLIB_ALLOWED = {
    "from remotedialer.client import TunnelClient": STDLIB_ADDED,
    "import remotedialer.cli.client": CLI_STDLIB_ADDED,
    ATTEMPT: STDLIB_ADDED,
    # the parser built and used as `remotedialer client` does: no shutil for the help's width
    "from remotedialer.cli import build_parser\nbuild_parser('client').parse_args(['client'])":
        CLI_STDLIB_ADDED | {"locale"},  # gettext's lookup of the language, from argparse
}


def added_beyond_websocket_client(statement: str) -> List[str]:
    """Top-level public modules that ``statement`` adds to a fresh
    interpreter that imported ``ssl`` and ``websocket`` first (the package's
    own modules aside)."""
    code = (
        "import sys, json, ssl, websocket\nbefore = set(sys.modules)\n"
        f"{statement}\n"
        "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        # (mypyc's runtime for the compiled build, REMOTEDIALER_MYPYC=1, is the package's own)
        "print(json.dumps(sorted(m for m in added\n"
        "    if not m.startswith(('_', 'remotedialer')) and not m.endswith('__mypyc'))))"
    )
    done = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120, check=True)
    added: List[str] = json.loads(done.stdout)
    return added


def loaded_after(statement: str) -> Dict[str, List[str]]:
    """The package's modules and the top-level packages in ``sys.modules``
    of a fresh interpreter after ``statement``."""
    code = (
        f"{statement}\nimport json, sys\n"
        "print(json.dumps({'package': sorted(m for m in sys.modules if m.split('.')[0] == 'remotedialer'),"
        " 'top': sorted({m.split('.')[0] for m in sys.modules})}))"
    )
    done = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120, check=True)
    result: Dict[str, List[str]] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("statement", sorted(AGENT_MODULES))
def test_the_agent_loads_only_what_it_needs(statement: str) -> None:
    loaded = loaded_after(statement)
    assert loaded["package"] == sorted(AGENT_MODULES[statement])
    assert sorted(set(FORBIDDEN) & set(loaded["top"])) == []


@pytest.mark.parametrize("statement", sorted(STDLIB_ALLOWED))
def test_the_agent_adds_little_to_websocket_client(statement: str) -> None:
    """Beyond ``ssl`` and websocket-client (which the agent needs), the agent
    loads only the few standard-library modules listed: ``subprocess``,
    ``http.client``, ``email``, ``asyncio``, ``json`` or a third-party package
    creeping in fails here."""
    assert sorted(set(added_beyond_websocket_client(statement)) - STDLIB_ALLOWED[statement]) == []


@pytest.mark.parametrize("statement", [
    "from remotedialer.client import TunnelClient", "import remotedialer.cli.client",
    "from remotedialer.cli import build_parser\nbuild_parser('client').parse_args(['client'])",
])
def test_importing_the_agent_loads_no_websocket_client_or_tls(statement: str) -> None:
    assert sorted(set(NOT_BEFORE_CONNECTING) & set(loaded_after(statement)["top"])) == []


def test_a_connection_attempt_loads_websocket_client() -> None:
    """The check above can fail: an attempt loads both (and only what
    :data:`CONNECTING` lists of the package, as the first test holds)."""
    assert sorted(set(NOT_BEFORE_CONNECTING) & set(loaded_after(ATTEMPT)["top"])) == NOT_BEFORE_CONNECTING


def test_the_stdlib_check_notices_a_heavy_import() -> None:
    """The check can fail: ``subprocess`` (what the CLI loaded for
    ``remotedialer bench`` before it imported it there) shows up."""
    added = added_beyond_websocket_client("import remotedialer.cli.client\nimport subprocess")
    assert "subprocess" in set(added) - CLI_STDLIB_ADDED


def test_every_public_name_of_the_root_still_resolves() -> None:
    """The root loads the server and HA layers on first use; each name of
    ``__all__`` resolves, and a server built through ``remotedialer.server``
    still gets the HA peering layer by default."""
    code = (
        "import remotedialer\n"
        "missing = [name for name in remotedialer.__all__ if getattr(remotedialer, name, None) is None]\n"
        "from remotedialer.server import Server\n"
        "server = Server(lambda request: ('key', True))\n"
        "unlisted = sorted(set(remotedialer.__all__) - set(dir(remotedialer)))\n"
        "print(missing, type(server.peering).__module__, unlisted)"
    )
    done = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["[]", "remotedialer.ha.peering", "[]"]


def test_the_check_notices_an_eager_server_import() -> None:
    """The check can fail: an agent that also imports the server shows up."""
    loaded = loaded_after("import remotedialer.cli.client\nimport remotedialer.server")
    assert loaded["package"] != AGENT_MODULES["import remotedialer.cli.client"]
    assert "werkzeug" in loaded["top"]


CONNECT_BY_NAME = """
import socket, sys
from remotedialer.transports.base import connect_tcp
with socket.create_server(("127.0.0.1", 0)) as server:
    port = server.getsockname()[1]
    connect_tcp("localhost", port, 10).close()
    print("encodings.idna" in sys.modules)
    socket.create_connection(("localhost", port), 10).close()
    print("encodings.idna" in sys.modules)
"""


def test_connecting_loads_no_idna_codec() -> None:
    """The agent's connection to its server (or proxy) does not import the
    ``idna`` codec for an ASCII host name (0.35 MiB with ``stringprep`` and
    ``unicodedata``), where ``socket.create_connection`` with the same name
    does (second line: the check can fail)."""
    done = subprocess.run([sys.executable, "-c", CONNECT_BY_NAME],
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True"]
