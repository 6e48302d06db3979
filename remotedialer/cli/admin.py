"""``remotedialer admin``: list, show and disconnect the agents of a server.

Talks to the server's admin API (``/admin/``, see
:mod:`remotedialer.gateway.admin`) with the secret of a user with the
``admin`` role, read from ``--token-file`` or the ``REMOTEDIALER_ADMIN_TOKEN``
environment variable (never from the command line, where ``ps`` shows it)::

    remotedialer admin --server http://127.0.0.1:8123 --token-file ops.secret list
    remotedialer admin show edge-1
    remotedialer admin disconnect edge-1

``list`` prints one line per agent (``--json`` prints the API's JSON).
Exit status: 0 done, 1 refused or not found (the server's answer on
stderr), 2 bad usage or server unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Tuple

__all__ = ["add_arguments", "run", "TOKEN_ENV"]

log = logging.getLogger(__name__)

#: The environment variable holding the admin secret.
TOKEN_ENV = "REMOTEDIALER_ADMIN_TOKEN"

#: Seconds to wait for the server's answer.
REQUEST_TIMEOUT = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``remotedialer admin`` options and actions."""
    parser.add_argument("--server", default="http://127.0.0.1:8123", metavar="URL",
                        help="the server's base URL (default http://127.0.0.1:8123)")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"file holding the admin secret (default: ${TOKEN_ENV})")
    parser.add_argument("--cacert", metavar="FILE", help="CA bundle to verify an https:// server with")
    parser.add_argument("--json", action="store_true", help="print the API's JSON")
    parser.add_argument("action", choices=("list", "show", "disconnect"))
    parser.add_argument("client_key", nargs="?", help="the agent's client key (show, disconnect)")


def _request(args: argparse.Namespace, method: str, path: str, secret: str) -> Tuple[int, Dict[str, Any]]:
    url = args.server.rstrip("/") + "/admin" + path
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {secret}"})
    context = None
    if args.cacert:
        import ssl

        context = ssl.create_default_context(cafile=args.cacert)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT, context=context) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {"error": exc.reason}
        return exc.code, body


def _print_agents(body: Dict[str, Any]) -> None:
    for agent in body.get("agents", []):
        sessions = agent.get("sessions", [])
        if not sessions:
            print(f"{agent['client_key']}\tpeer\t{','.join(agent.get('peers', []))}")
        for session in sessions:
            print(f"{agent['client_key']}\tlocal\t{session['remote_address']}\t"
                  f"since {session['connected_since']}\t{session['open_connections']} conns\t"
                  f"sent {session['bytes_sent']} B\treceived {session['bytes_received']} B")


def run(args: argparse.Namespace) -> int:
    """Do the action; returns the exit status."""
    from . import read_secret, setup_logging

    setup_logging(quiet=True)
    if args.action != "list" and not args.client_key:
        print(f"remotedialer admin {args.action} needs a client key", file=sys.stderr)
        return 2
    try:
        secret = read_secret(args.token_file, TOKEN_ENV)
    except OSError as exc:
        print(f"cannot read --token-file: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print(f"no admin secret: give --token-file or set {TOKEN_ENV}", file=sys.stderr)
        return 2
    key = urllib.parse.quote(args.client_key or "", safe="")
    method, path = {
        "list": ("GET", "/agents"),
        "show": ("GET", f"/agents/{key}"),
        "disconnect": ("DELETE", f"/agents/{key}"),
    }[args.action]
    try:
        status, body = _request(args, method, path, secret)
    except (OSError, ValueError) as exc:
        print(f"cannot reach {args.server}: {exc}", file=sys.stderr)
        return 2
    if status != 200:
        print(f"HTTP {status}: {body.get('error', body)}", file=sys.stderr)
        return 1
    if args.action == "list" and not args.json:
        _print_agents(body)
    else:
        print(json.dumps(body, indent=2, sort_keys=True))
    return 0
