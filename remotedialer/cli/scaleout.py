"""Deprecated: moved to :mod:`remotedialer.app`."""
from ..deprecation import alias_module
alias_module(__name__, "remotedialer.app")
