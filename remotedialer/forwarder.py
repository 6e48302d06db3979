"""Deprecated: moved to :mod:`remotedialer.gateway.forwarder_app` (and gateway.upstream)."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.gateway.forwarder_app")
