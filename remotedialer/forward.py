"""Deprecated: moved to :mod:`remotedialer.server.port_forward`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.server.port_forward")
