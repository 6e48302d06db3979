"""Defaults a higher layer plugs into a lower one that may not import it.

The server side (layer 3) never imports high availability (layer 4); the
package root plugs :meth:`Peering.for_server
<remotedialer.ha.peering.Peering.for_server>` in here, as a function that
imports it only when a server is built, so that neither ``import
remotedialer`` nor the agent loads the server or the HA layer.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

__all__ = ["PeeringFactorySlot", "default_peering", "set_default_peering"]

PeeringFactorySlot = Callable[[Any], Any]
"""A :data:`~remotedialer.server.tunnel_server.PeeringFactory`, typed loosely
here (its types live in the server layer)."""

_lock = threading.Lock()  # guards _default_peering
_default_peering: Optional[PeeringFactorySlot] = None


def set_default_peering(factory: Optional[PeeringFactorySlot]) -> None:
    """Build the peering layer of servers made from now on with ``factory``
    unless they are given one (``None``: none)."""
    global _default_peering
    with _lock:
        _default_peering = factory


def default_peering() -> Optional[PeeringFactorySlot]:
    """The factory set by :func:`set_default_peering`, or ``None``."""
    with _lock:
        return _default_peering
