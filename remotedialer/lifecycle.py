"""Deprecated: moved to :mod:`remotedialer.ha.lifecycle`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.ha.lifecycle")
