"""Deprecated: moved to :mod:`remotedialer.ha.peering`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.ha.peering")
