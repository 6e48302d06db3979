"""Deprecated: moved to :mod:`remotedialer.metrics.exposition`."""
from .deprecation import alias_module
alias_module(__name__, "remotedialer.metrics.exposition")
