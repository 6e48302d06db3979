"""Deprecated: moved to :mod:`remotedialer.transports.wsgi`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.transports.wsgi")
