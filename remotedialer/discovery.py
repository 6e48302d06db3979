"""Deprecated: moved to :mod:`remotedialer.ha.discovery`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.ha.discovery")
