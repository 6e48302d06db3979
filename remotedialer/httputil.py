"""Deprecated: moved to :mod:`remotedialer.server.wsgi`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.server.wsgi")
