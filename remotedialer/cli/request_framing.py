"""Deprecated: moved to :mod:`remotedialer.gateway.http1` (and gateway.frontend)."""
from ..deprecation import alias_module
alias_module(__name__, "remotedialer.gateway.http1")
