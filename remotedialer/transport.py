"""Deprecated: moved to :mod:`remotedialer.transports.base`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.transports.base")
