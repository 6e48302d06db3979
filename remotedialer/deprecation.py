"""Old module paths that still import, with a warning.

The package was laid out by layer (docs/contributing.rst); each module that
moved left a three-line shim at its old path which calls :func:`alias_module`,
so ``import remotedialer.forward`` keeps working and gives the module at its
new path, with a :class:`DeprecationWarning` that names it. :data:`MOVED`
lists every such path.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Dict

__all__ = ["MOVED", "alias_module"]

MOVED: Dict[str, str] = {
    "remotedialer.forward": "remotedialer.server.port_forward",
    "remotedialer.session_manager": "remotedialer.server.sessions",
    "remotedialer.httputil": "remotedialer.server.wsgi",
    "remotedialer.transport": "remotedialer.transports.base",
    "remotedialer.wsgi_transport": "remotedialer.transports.wsgi",
    "remotedialer.peering": "remotedialer.ha.peering",
    "remotedialer.discovery": "remotedialer.ha.discovery",
    "remotedialer.lifecycle": "remotedialer.ha.lifecycle",
    "remotedialer.metrics_exposition": "remotedialer.metrics.exposition",
    "remotedialer.forwarder": "remotedialer.gateway.forwarder_app",
    "remotedialer.cli.request_framing": "remotedialer.gateway.http1",
    "remotedialer.cli.scaleout": "remotedialer.app",
}
"""Old module path -> the path it moved to."""


def _caller_stacklevel(shim: str) -> int:
    """The ``stacklevel`` that points past this module and the shim module
    ``shim`` at the line that imported it (``warnings`` itself skips the
    import machinery's frames, so they are not counted)."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None:
        if frame.f_globals.get("__name__") not in (__name__, shim):
            if not frame.f_code.co_filename.startswith("<frozen importlib"):
                break
        else:
            level += 1
        frame = frame.f_back
    return level


def alias_module(old_name: str, new_name: str) -> None:
    """Make ``import old_name`` give the module ``new_name`` (the same object,
    in :data:`sys.modules`), warning that ``old_name`` is deprecated."""
    warnings.warn(
        f"{old_name} is deprecated: import {new_name} instead",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(old_name),
    )
    sys.modules[old_name] = importlib.import_module(new_name)
