"""Deprecated: moved to :mod:`remotedialer.gateway.forwarder_app` (the upstream
client and pool to :mod:`remotedialer.gateway.upstream`)."""

from .deprecation import alias_module

alias_module(__name__, "remotedialer.gateway.forwarder_app")
