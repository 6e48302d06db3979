"""The gateway's errors that are ``OSError`` subclasses.

They live apart from the modules that raise them because those modules may
be compiled with mypyc (setup.py, ``REMOTEDIALER_MYPYC=1``), and a class
compiled by mypyc cannot subclass ``OSError``; this module always stays
Python. :mod:`~remotedialer.gateway.frontend` and
:mod:`~remotedialer.gateway.http1` export them under their names as before.
"""

from __future__ import annotations

__all__ = ["BadChunkedBody", "BadResponse"]


class BadChunkedBody(OSError):
    """A chunked request body breaks RFC 9112 §7.1 (the request fails and
    its connection is closed)."""


class BadResponse(ConnectionError):
    """The target's answer is not HTTP/1.1 the forwarder can pass on; the
    connection is unusable afterwards."""
