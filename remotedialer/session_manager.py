"""Deprecated: moved to :mod:`remotedialer.server.sessions`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.server.sessions")
