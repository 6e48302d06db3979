"""Deprecated: the request framing rules moved to :mod:`remotedialer.gateway.http1`
(``request_framing_error``), the chunked request body to
:mod:`remotedialer.gateway.frontend`."""

from ..deprecation import alias_module

alias_module(__name__, "remotedialer.gateway.http1")
